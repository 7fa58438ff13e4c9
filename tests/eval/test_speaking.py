"""Speaking metrics: ProAssist's matching (window, cost, silent frames) and formulas, on
hand-made cases, one per way our old matching differed from theirs (issue 16)."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from dst_train.eval.speaking import (
    frame_of,
    match_turns,
    speaking_scores,
    window_frames,
    window_seconds,
)

ASSEMBLY = window_frames("assembly101", 2.0)  # (-4, 8) frames


def exact(pairs):
    """Cosine 1 for the same text, 0 otherwise (a stand-in for embeddings in math tests)."""
    return [1.0 if a == b else 0.0 for a, b in pairs]


def table(values):
    """A similarity that reads the cosine of each (gen, ref) pair from ``values``."""
    return lambda pairs: [values[p] for p in pairs]


def silent(n):
    return [""] * n


def pairs_of(m):
    return [(i, j) for i, j, _ in m.matched]


def test_a_reply_inside_the_window_matches_and_one_outside_does_not():
    # assembly101 at 2 fps: reference from 4 frames before to 8 frames after the prediction
    gen, ref = silent(40), silent(40)
    gen[10], ref[18] = "a", "a"  # +8 frames: inside (edge)
    gen[30], ref[21] = "b", "b"  # -9 frames: outside -> redundant + missed
    m = match_turns(gen, ref, exact, ASSEMBLY)
    assert pairs_of(m) == [(10, 18)]
    assert m.redundant == [30] and m.missed == [21]


def test_window_is_asymmetric():
    gen, ref = silent(30), silent(30)
    gen[10], ref[6] = "x", "x"  # -4 frames = -2 s: inside
    assert len(match_turns(gen, ref, exact, ASSEMBLY).matched) == 1
    gen, ref = silent(30), silent(30)
    gen[10], ref[5] = "x", "x"  # -5 frames: outside
    m = match_turns(gen, ref, exact, ASSEMBLY)
    assert not m.matched and m.redundant == [10] and m.missed == [5]


def test_silent_frames_compete_a_dissimilar_reply_is_redundant_not_a_bad_match():
    # point 1: every frame in the window is a candidate; a silent one costs 1 + distance.
    # cos 0 to the reply one frame later costs 1 + 0.3/8**1.5 > 1 (own, silent frame): redundant
    gen, ref = silent(20), silent(20)
    gen[10], ref[11] = "open the box", "close the lid"
    m = match_turns(gen, ref, table({("open the box", "close the lid"): 0.0}), ASSEMBLY)
    assert m.matched == [] and m.redundant == [10] and m.missed == [11]
    # cos 0.1 costs 0.9 + 0.013 < 1: now the reply is the cheaper partner (a wrong match)
    m = match_turns(gen, ref, table({("open the box", "close the lid"): 0.1}), ASSEMBLY)
    assert pairs_of(m) == [(10, 11)] and m.matched[0][2] == pytest.approx(0.1, abs=1e-7)


def test_similarity_is_the_absolute_cosine():
    # point 2: cos -0.9 is similarity 0.9 (a correct match), as ProAssist's 1 - |cos|
    gen, ref = silent(20), silent(20)
    gen[5], ref[6] = "a", "b"
    m = match_turns(gen, ref, table({("a", "b"): -0.9}), ASSEMBLY)
    assert m.matched[0][2] == pytest.approx(0.9, abs=1e-7)
    assert speaking_scores([m])["correct_matches"] == 1


def test_semantic_score_is_the_mean_over_matches_at_or_above_one_half():
    # point 3: s >= 0.5 enters the mean, s > 0.5 is "correct" (0.5 exactly: in one, not the other)
    gen, ref = silent(60), silent(60)
    gen[5], ref[6] = "a", "A"
    gen[25], ref[26] = "b", "B"
    gen[45], ref[46] = "c", "C"
    sim = table({("a", "A"): 0.5, ("b", "B"): 0.9, ("c", "C"): 0.55})
    s = speaking_scores([match_turns(gen, ref, sim, ASSEMBLY)])
    assert s["matches"] == 3 and s["correct_matches"] == 2
    assert s["semantic_similarity"] == pytest.approx((0.5 + 0.9 + 0.55) / 3, abs=1e-6)
    sim = table({("a", "A"): 0.3, ("b", "B"): 0.9, ("c", "C"): 0.55})
    s = speaking_scores([match_turns(gen, ref, sim, ASSEMBLY)])
    assert s["semantic_similarity"] == pytest.approx((0.9 + 0.55) / 2, abs=1e-6)


def test_window_per_dataset_and_time_to_frame_by_truncation():
    # point 5: ProAssist's table, first key the name contains; int(t * fps) for each side
    assert window_seconds("assembly101") == (-2.0, 4.0)
    assert window_seconds("ego4d/dialog") == (-4.0, 8.5)
    assert window_seconds("ego4d_narration") == (-2.5, 2.5)  # "narration" is looked at first
    assert window_seconds("epickitchens") == (-1.5, 3.0)
    assert window_seconds("something_else") == (-2.5, 2.5)
    assert window_frames("ego4d", 2.0) == (-8, 17)
    assert window_frames("epickitchens", 1.0) == (-1, 3)  # int(-1.5) = -1, not round
    assert frame_of(1.9999, 2.0) == 3 and frame_of(2.0, 2.0) == 4  # round would give 4, 4
    assert frame_of(0.74, 2.0) == 1


def test_a_zero_cost_edge_vanishes_as_in_proassist_unless_kept():
    # point 6: identical text on the identical frame: cost exactly 0 -> no edge in their graph
    gen, ref = silent(20), silent(20)
    gen[10], ref[10] = "same", "same"
    m = match_turns(gen, ref, exact, ASSEMBLY)
    assert m.matched == [] and m.missed == [10] and m.redundant == [10]
    m = match_turns(gen, ref, exact, ASSEMBLY, keep_zero_cost=True)
    assert pairs_of(m) == [(10, 10)] and not m.missed and not m.redundant


def test_the_matching_prefers_the_similar_text_then_the_nearer_frame():
    gen, ref = silent(30), silent(30)
    gen[10] = "open the box"
    ref[11], ref[13] = "close the lid", "open the box"
    m = match_turns(gen, ref, exact, ASSEMBLY)
    assert pairs_of(m) == [(10, 13)]  # text beats distance
    gen, ref = silent(30), silent(30)
    gen[10] = "x"
    ref[12], ref[15] = "x", "x"
    m = match_turns(gen, ref, exact, ASSEMBLY)
    assert pairs_of(m) == [(10, 12)] and m.missed == [15]


def test_one_to_one_two_predictions_cannot_share_a_reference():
    gen, ref = silent(20), silent(20)
    gen[5], gen[6] = "x", "x"
    ref[7] = "x"
    m = match_turns(gen, ref, exact, ASSEMBLY)
    assert len(m.matched) == 1 and len(m.redundant) == 1 and not m.missed


def test_formulas_on_a_hand_counted_case():
    # video 1: 2 matches (1 correct), 1 redundant; video 2: 1 correct match, 2 missed
    gen1, ref1 = silent(40), silent(40)
    gen1[2], ref1[3] = "a", "a"  # correct
    gen1[12], ref1[13] = "b", "c"  # a wrong match: cos 0.2 beats the silent frames' cost 1
    gen1[30] = "d"  # redundant: no reference near
    gen2, ref2 = silent(40), silent(40)
    gen2[5], ref2[6] = "e", "e"
    ref2[20], ref2[35] = "f", "g"
    sim = table({("a", "a"): 1.0, ("b", "c"): 0.2, ("e", "e"): 1.0})
    s = speaking_scores(
        [match_turns(gen1, ref1, sim, ASSEMBLY), match_turns(gen2, ref2, sim, ASSEMBLY)]
    )
    m_all, m, red, miss = 3, 2, 1, 2
    p, r = m / (m_all + red), m / (m_all + miss)
    assert (s["matches"], s["correct_matches"], s["redundant"], s["missed"]) == (3, 2, 1, 2)
    assert s["speak_precision"] == pytest.approx(0.5)
    assert s["speak_recall"] == pytest.approx(0.4)
    assert s["speak_f1"] == pytest.approx(2 * p * r / (p + r))
    assert s["jaccard"] == pytest.approx(2 / 6)
    assert s["missing_rate"] == pytest.approx(2 / 5)
    assert s["redundant_rate"] == pytest.approx(1 / 4)
    assert s["semantic_similarity"] == pytest.approx(1.0)  # 0.2 is below one half


def test_no_prediction_and_no_reference():
    s = speaking_scores([match_turns(silent(10), silent(10), exact, ASSEMBLY)])
    assert s["speak_f1"] == 0.0 and s["missed"] == 0 and s["redundant"] == 0
    ref = silent(10)
    ref[3] = "x"
    s = speaking_scores([match_turns(silent(10), ref, exact, ASSEMBLY)])
    assert s["missing_rate"] == 1.0 and s["speak_recall"] == 0.0


def _reference_matching(gen, ref, sim, lo, hi):
    """An independent implementation of the rules (docs/evaluation.md): a dense cost matrix
    over every frame, silent frames at text cost 1, a large number outside the window,
    Hungarian assignment. Returns the pairs that landed on a reference turn."""
    rows, n = [i for i, g in enumerate(gen) if g], len(gen)
    rg = max(abs(lo), hi)
    big = 1e9
    cost = np.full((len(rows), n), big)
    for a, i in enumerate(rows):
        for j in range(n):
            if lo <= j - i <= hi:
                text = 1 - abs(sim[(i, j)]) if ref[j] else 1.0
                cost[a, j] = text + abs(i - j) ** 1.5 * 0.3 / rg**1.5
    ra, ca = linear_sum_assignment(cost)
    return [(rows[a], int(c)) for a, c in zip(ra, ca, strict=True) if ref[c]]


# assembly101's window, and one reaching further back than ahead (the distance scale is the
# longer side, whichever it is)
@pytest.mark.parametrize("window", [ASSEMBLY, (-8, 3)])
def test_randomized_case_agrees_with_an_independent_implementation(window):
    rng = np.random.default_rng(0)
    results, counts = [], np.zeros(4)
    for _video in range(5):
        n = 120
        gen = [f"g{i}" if rng.random() < 0.12 else "" for i in range(n)]
        ref = [f"r{i}" if rng.random() < 0.1 else "" for i in range(n)]
        sim = {(i, j): float(rng.uniform(-1, 1)) for i in range(n) for j in range(n)}
        by_text = {(gen[i], ref[j]): s for (i, j), s in sim.items() if gen[i] and ref[j]}
        m = match_turns(gen, ref, table(by_text), window)
        expected = _reference_matching(gen, ref, sim, *window)
        assert sorted(pairs_of(m)) == sorted(expected)
        m_all = len(expected)
        correct = sum(1 for i, j in expected if abs(sim[(i, j)]) > 0.5)
        red = sum(1 for g in gen if g) - m_all
        miss = sum(1 for r in ref if r) - m_all
        counts += (m_all, correct, red, miss)
        results.append(m)
    m_all, m, red, miss = counts
    assert red > 0 and miss > 0 and m_all > m > 0  # the case exercises every count
    s = speaking_scores(results)
    p, r = m / (m_all + red), m / (m_all + miss)
    assert s["speak_precision"] == pytest.approx(p)
    assert s["speak_recall"] == pytest.approx(r)
    assert s["speak_f1"] == pytest.approx(2 * p * r / (p + r))
    assert s["jaccard"] == pytest.approx(m / (m_all + miss + red))
    assert s["missing_rate"] == pytest.approx(miss / (m_all + miss))
    assert s["redundant_rate"] == pytest.approx(red / (m_all + red))


def test_reference_is_the_first_assistant_turn_after_a_frames_block_and_a_dot_is_silence():
    # point 7: ProAssist takes the assistant turn after the frames block (a user turn there is
    # an input) and treats a lone "." as silence; we used to join every assistant turn
    from dst_train.data.labels import build_clip_labels
    from dst_train.data.proassist import ClipRecord, Turn
    from dst_train.eval.evaluate import reference_text

    conv = [
        Turn("system", "sys"),
        Turn("frames", start=0, end=4),
        Turn("user", "what now?", time=2.0),
        Turn("assistant", "Attach the wheel.", time=2.0),
        Turn("assistant", "Then the axle.", time=2.0),
        Turn("frames", start=4, end=8),
        Turn("assistant", " . ", time=4.0),
        Turn("frames", start=8, end=10),
    ]
    labels = build_clip_labels(ClipRecord("assembly101", "v", 0, "f.arrow", 0, 10, conv))
    assert reference_text(labels, 3) == "Attach the wheel."
    assert reference_text(labels, 7) == ""
    assert reference_text(labels, 9) == ""


def test_each_rate_is_guarded_by_its_own_denominator():
    # one correct match, one missed reference, one redundant prediction: as many matches as
    # misses and as redundant turns, where a guard on a difference would read 0
    gen, ref = silent(40), silent(40)
    gen[2], ref[3] = "a", "a"
    ref[20] = "b"  # missed
    gen[35] = "c"  # redundant
    s = speaking_scores([match_turns(gen, ref, exact, ASSEMBLY)])
    assert (s["matches"], s["missed"], s["redundant"]) == (1, 1, 1)
    assert s["speak_precision"] == s["speak_recall"] == pytest.approx(0.5)
    assert s["missing_rate"] == s["redundant_rate"] == pytest.approx(0.5)
    assert s["jaccard"] == pytest.approx(1 / 3) and s["speak_f1"] == pytest.approx(0.5)
