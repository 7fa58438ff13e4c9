"""The micro-batch search on synthetic memory curves: linear, with a jump, noisy, nothing fits."""

import numpy as np
import pytest

from dst_train.tune.search import (
    NothingFits,
    Probe,
    SearchResult,
    accumulation_for,
    doubling_search,
    search,
    search_from,
)

GiB = 2**30
LIMIT = int(0.9 * 24 * GiB)


def curve(peak_of, oom_above=None):
    """A measure() over a peak-memory function; sizes past ``oom_above`` raise OOM."""

    def measure(b):
        if oom_above is not None and b > oom_above:
            return Probe(b, 0, 1.0, oom=True)
        return Probe(b, int(peak_of(b)), 1.0)

    return measure


def linear(fixed, per):
    return lambda b: fixed + per * b


def jump(fixed, per, at, extra):
    return lambda b: fixed + per * b + (extra if b >= at else 0)


def noisy(fixed, per, rel, seed):
    rng = np.random.default_rng(seed)
    cache = {}
    return lambda b: cache.setdefault(b, (fixed + per * b) * (1 + rng.uniform(-rel, rel)))


def check(result, peak_of):
    assert result.micro_batch >= 1
    assert int(peak_of(result.micro_batch)) <= LIMIT  # never a size whose real peak is over
    assert all(p.micro_batch != result.micro_batch or not p.oom for p in result.probes)
    sizes = [p.micro_batch for p in result.probes]
    assert len(set(sizes)) == len(sizes), sizes  # a probe costs a minute on a GPU: never twice


@pytest.mark.parametrize(
    "fixed,per",
    [(16 * GiB, 0.4 * GiB), (5 * GiB, 0.05 * GiB), (2 * GiB, 1.3 * GiB), (21 * GiB, 0.25 * GiB)],
)
def test_linear_curve_takes_at_most_four_probes_and_finds_the_optimum(fixed, per):
    peak = linear(fixed, per)
    r = search(curve(peak), LIMIT)
    check(r, peak)
    assert len(r.probes) <= 4
    assert r.micro_batch == max(b for b in range(1, 2000) if int(peak(b)) <= LIMIT)
    assert r.per_sample_bytes == pytest.approx(per, rel=1e-6)
    for p in r.probes[2:]:  # the line through probes 1 and 2 predicts each later peak
        assert p.predicted_bytes == pytest.approx(p.peak_bytes, rel=1e-6)


def test_jump_in_the_curve_is_never_picked():
    peak = jump(10 * GiB, 0.5 * GiB, at=12, extra=6 * GiB)  # e.g. an algorithm switch at 12
    r = search(curve(peak), LIMIT)
    check(r, peak)
    assert r.micro_batch == 11  # below the jump: 15.5 GiB; 12 would be 22 GiB


@pytest.mark.parametrize("seed", range(20))
def test_noisy_curve_never_goes_over(seed):
    peak = noisy(12 * GiB, 0.3 * GiB, 0.03, seed)
    r = search(curve(peak), LIMIT)
    check(r, peak)
    best_possible = max(b for b in range(1, 100) if peak(b) <= LIMIT)
    assert r.micro_batch >= 0.85 * best_possible  # noise costs a little, never an overshoot


def test_oom_probes_are_upper_bounds():
    peak = linear(8 * GiB, 0.5 * GiB)
    r = search(curve(peak, oom_above=10), LIMIT)  # the allocator fails before the line says
    check(r, peak)
    assert r.micro_batch == 10


def test_nothing_fits():
    with pytest.raises(NothingFits) as err:
        search(curve(linear(23 * GiB, 1 * GiB)), LIMIT)
    assert len(err.value.result.probes) == 1
    assert err.value.result.micro_batch == 0  # "nothing fits" in the report
    with pytest.raises(NothingFits):
        search(curve(linear(1 * GiB, 1 * GiB), oom_above=0), LIMIT)
    # the baseline says so too, after the one probe
    with pytest.raises(NothingFits) as err:
        doubling_search(curve(linear(23 * GiB, 1 * GiB)), LIMIT)
    assert [p.micro_batch for p in err.value.result.probes] == [1]
    assert err.value.result.micro_batch == 0


@pytest.mark.parametrize("oom", [False, True])
def test_when_only_one_sample_fits_two_probes_say_so(oom):
    """A model that leaves room for one sample a GPU (2.2B on a 24 GB card at long sequences):
    micro-batch 2 over the limit, or out of memory, ends the search at 1."""
    peak = linear(20 * GiB, 1 * GiB)  # 1: 21 GiB, 2: 22 GiB over the 21.6 GiB limit
    for find in (search, doubling_search):
        r = find(curve(peak, oom_above=1 if oom else None), LIMIT)
        assert r.micro_batch == 1 and [p.micro_batch for p in r.probes] == [1, 2]
        assert r.peak_bytes == int(peak(1))


def test_max_micro_caps_the_answer():
    peak = linear(1 * GiB, 0.01 * GiB)
    for find in (search, doubling_search):
        r = find(curve(peak), LIMIT, max_micro=16)
        check(r, peak)
        assert r.micro_batch == 16 and r.peak_bytes == int(peak(16))
    assert [p.micro_batch for p in r.probes] == [1, 2, 4, 8, 16]  # the baseline's doublings


def test_the_result_reports_the_peak_of_the_chosen_size():
    probes = [Probe(1, 5 * GiB, 1.0), Probe(4, 0, 1.0, oom=True), Probe(3, 9 * GiB, 1.0)]
    assert SearchResult(3, LIMIT, probes).peak_bytes == 9 * GiB
    assert SearchResult(3, LIMIT, probes).to_dict()["peak_bytes"] == 9 * GiB
    assert SearchResult(4, LIMIT, probes).peak_bytes == 0  # only an OOM at that size
    assert SearchResult(0, LIMIT, []).peak_bytes == 0


def test_recorded_cpu_curve():
    """Peaks recorded from the tiny model on CPU (benchmarks/results/autotune_bench_smoke.json)."""
    import json
    from pathlib import Path

    rec = json.loads(
        (Path(__file__).parents[2] / "benchmarks/results/autotune_bench_smoke.json").read_text()
    )["recorded_curve"]
    table = {int(b): v for b, v in rec.items()}
    limit = sorted(table.values())[len(table) // 2]  # a limit inside the recorded range
    sizes = sorted(table)

    def peak(b):  # measured sizes as recorded, the others interpolated between them
        return table.get(b) or np.interp(b, sizes, [table[x] for x in sizes])

    r = search(curve(peak), limit, max_micro=max(table))
    assert peak(r.micro_batch) <= limit


def test_doubling_baseline_finds_the_same_size_with_more_probes():
    peak = linear(16 * GiB, 0.4 * GiB)
    ours, base = search(curve(peak), LIMIT), doubling_search(curve(peak), LIMIT)
    assert ours.micro_batch == base.micro_batch == 14
    assert len(ours.probes) < len(base.probes)
    check(base, peak)
    # doubling until 16 goes over, then bisecting between 8 and 16 only
    assert [p.micro_batch for p in base.probes] == [1, 2, 4, 8, 16, 12, 14, 15]


@pytest.mark.parametrize("start", [1, 5, 13, 14, 15, 16, 20, 40, 200])
def test_a_search_from_a_known_size_brackets_the_answer(start):
    """The throughput benchmark's fit search for both stacks, seeded with the autotuner's size:
    exact wherever it starts, two probes when it starts at the answer, few when near it."""
    peak = linear(16 * GiB, 0.4 * GiB)  # 14 is the largest under the limit
    r = search_from(curve(peak), LIMIT, start, max_micro=64)
    check(r, peak)
    assert r.micro_batch == 14
    sizes = [p.micro_batch for p in r.probes]
    assert sizes[0] == min(start, 64)
    assert len(sizes) <= {13: 4, 14: 2, 15: 2, 16: 4}.get(start, 12), sizes
    oom = search_from(curve(peak, oom_above=9), LIMIT, 14, max_micro=64)  # OOM, no peak
    assert oom.micro_batch == 9 and [p.micro_batch for p in oom.probes] == [14, 13, 11, 7, 9, 10]


def test_a_search_from_a_known_size_says_when_nothing_fits_or_caps():
    with pytest.raises(NothingFits) as err:
        search_from(curve(linear(23 * GiB, 1 * GiB)), LIMIT, 6)
    assert [p.micro_batch for p in err.value.result.probes] == [6, 5, 3, 1]
    r = search_from(curve(linear(1 * GiB, 0.01 * GiB)), LIMIT, 6, max_micro=16)
    assert r.micro_batch == 16 and [p.micro_batch for p in r.probes] == [6, 7, 16]


def test_a_search_from_a_size_far_below_the_answer_follows_the_line():
    """Each fit probe is a fresh 2.2B process (~1 min): from 14 to an answer of 22, steps of
    1, 2, 4, 8 and bisection took 8 probes (14 15 17 21 29 25 23 22) where the line through the
    first two says where to look: the size it predicts, then one past it."""
    peak = linear(16 * GiB, 0.25 * GiB)  # 22 is the largest under the limit
    r = search_from(curve(peak), LIMIT, 14, max_micro=64)
    check(r, peak)
    assert [p.micro_batch for p in r.probes] == [14, 15, 22, 23]
    jumped = jump(16 * GiB, 0.25 * GiB, at=20, extra=2 * GiB)  # the line overshoots: 19
    r = search_from(curve(jumped), LIMIT, 14, max_micro=64)
    check(r, jumped)
    assert r.micro_batch == 19 and len(r.probes) <= 6

    # a flat line (the peaks of two sizes read alike: a measure coarser than a sample's
    # memory) predicts nothing: one size at a time, up to the cap
    r = search_from(curve(lambda b: 10 * GiB), LIMIT, 6, max_micro=8)
    assert r.micro_batch == 8 and [p.micro_batch for p in r.probes] == [6, 7, 8]


def test_accumulation_keeps_the_global_batch():
    assert accumulation_for(64, 7, 2) == (4, 8)  # 7 does not divide 32: 4 does
    assert accumulation_for(64, 32, 2) == (32, 1)
    assert accumulation_for(64, 100, 2) == (32, 1)
    for micro in range(1, 40):
        m, acc = accumulation_for(96, micro, 2)
        assert m <= micro and m * acc * 2 == 96
    with pytest.raises(ValueError):
        accumulation_for(63, 4, 2)


def test_the_probe_table_marks_oom_and_over_the_limit_as_not_fitting():
    from dst_train.tune.autotune import table

    probes = [
        Probe(1, 10 * GiB, 31.0),
        Probe(2, 12 * GiB, 33.0, predicted_bytes=12 * GiB),
        Probe(8, 0, 5.0, oom=True, predicted_bytes=20 * GiB),  # no measured peak
        Probe(5, 18 * GiB, 40.0, predicted_bytes=17 * GiB),  # over a 16 GiB limit
    ]
    rows = table({"probes": [vars(p) for p in probes], "limit_bytes": 16 * GiB}).splitlines()
    assert rows[2:] == [
        "| 1 |  | 10.00 | yes | 31.0 |",
        "| 2 | 12.00 | 12.00 | yes | 33.0 |",
        "| 8 | 20.00 | OOM | no | 5.0 |",
        "| 5 | 17.00 | 18.00 | no | 40.0 |",
    ]
