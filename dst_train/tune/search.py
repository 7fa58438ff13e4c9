"""Micro-batch search from measured memory peaks (no model code here: ``measure`` does that).

A probe at micro-batch ``b`` returns the peak memory of full training steps (bytes, the maximum
over ranks). Peak memory is close to ``fixed + b · per_sample``, so after two probes (1 and 2)
a line predicts the largest ``b`` under the limit, and one more probe at that ``b`` verifies it.
Curves are not exactly linear (allocator rounding, a kernel that switches algorithm, noise), so:

* the slope used is the *largest* seen between successive good probes (conservative);
* a probe over the limit (or an OOM) becomes an upper bound and the next prediction uses the
  slope through it, so a jump pulls the prediction down; when the line still points at or past
  that bound (an OOM has no measured peak) the next probe bisects instead;
* the answer is always a size that was *measured* under the limit — a prediction alone is
  never returned.
On a linear curve this takes 3 probes (1, 2, the prediction).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class Probe:
    micro_batch: int
    peak_bytes: int  # 0 when the probe ran out of memory
    seconds: float
    oom: bool = False
    predicted_bytes: int | None = None  # what the line predicted before this probe
    real_steps: int | None = None  # optimizer steps that were not skipped (fp16 overflow)
    steps: int | None = None  # steps run (fewer than asked when a deadline stopped the probe)

    def fits(self, limit: int) -> bool:
        return not self.oom and self.peak_bytes <= limit


@dataclass
class SearchResult:
    micro_batch: int  # 0 = nothing fits
    limit_bytes: int
    probes: list[Probe] = field(default_factory=list)
    fixed_bytes: float | None = None  # the line's intercept (model states, context, buffers)
    per_sample_bytes: float | None = None

    @property
    def peak_bytes(self) -> int:
        return next(
            (p.peak_bytes for p in self.probes if p.micro_batch == self.micro_batch and not p.oom),
            0,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_bytes": self.peak_bytes}


class NothingFits(RuntimeError):
    """Even micro-batch 1 goes over the limit."""


def _slope(good: list[Probe], bad: Probe | None) -> float:
    """Bytes per extra sample: the steepest segment among good probes (and up to the smallest
    bad probe, when it has a measured peak)."""
    pts = sorted((p.micro_batch, p.peak_bytes) for p in good)
    if bad is not None and not bad.oom:
        pts.append((bad.micro_batch, bad.peak_bytes))
    slopes = [
        (b2 - b1) / (m2 - m1) for (m1, b1), (m2, b2) in zip(pts, pts[1:], strict=False) if m2 > m1
    ]
    return max(slopes, default=0.0)


def search(
    measure: Callable[[int], Probe], limit_bytes: int, max_micro: int = 4096, max_probes: int = 8
) -> SearchResult:
    """Largest micro-batch whose measured peak is ≤ ``limit_bytes``. Raises :class:`NothingFits`
    when micro-batch 1 does not fit (the result is attached as ``err.result``)."""
    result = SearchResult(0, limit_bytes)

    def probe(b: int, predicted: float | None = None) -> Probe:
        p = measure(b)
        p.predicted_bytes = None if predicted is None else int(predicted)
        result.probes.append(p)
        return p

    first = probe(1)
    if not first.fits(limit_bytes):
        err = NothingFits(
            f"micro-batch 1 needs {first.peak_bytes / 2**30:.2f} GiB"
            f"{' (OOM)' if first.oom else ''}, limit {limit_bytes / 2**30:.2f} GiB"
        )
        err.result = result
        raise err
    good, bad = [first], None
    if max_micro >= 2:
        second = probe(2)
        if second.fits(limit_bytes):
            good.append(second)
        else:
            bad = second
    while len(result.probes) < max_probes:
        best = max(good, key=lambda p: p.micro_batch)
        upper = min(max_micro, (bad.micro_batch - 1) if bad else max_micro)
        if best.micro_batch >= upper:
            break
        slope = _slope(good, bad)
        step = _samples_to(limit_bytes, best, slope) if slope > 0 else upper - best.micro_batch
        if step < 1:
            break  # the line says the next size does not fit
        target = best.micro_batch + step
        if bad is not None and target >= upper:
            # the line does not see what failed (an OOM has no peak): bisect instead
            target = (best.micro_batch + bad.micro_batch) // 2
        target = min(target, upper)  # > best: step >= 1, and a bisection has bad >= best + 2
        p = probe(target, best.peak_bytes + slope * (target - best.micro_batch))
        if p.fits(limit_bytes):
            good.append(p)
        else:
            bad = p if bad is None or p.micro_batch < bad.micro_batch else bad
    best = max(good, key=lambda p: p.micro_batch)
    result.micro_batch = best.micro_batch
    slope = _slope(good, None)
    result.per_sample_bytes = slope or None
    result.fixed_bytes = best.peak_bytes - slope * best.micro_batch if slope else None
    return result


def doubling_search(
    measure: Callable[[int], Probe], limit_bytes: int, max_micro: int = 4096
) -> SearchResult:
    """The baseline (Lightning's ``binsearch`` mode): double until a size fails, then bisect
    between the last good and the first failing size."""
    result = SearchResult(0, limit_bytes)
    fits = _recorded(measure, result)
    lo, hi = 0, None
    b = 1
    while b <= max_micro:
        if fits(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    return _bisected(result, fits, lo, hi or max_micro + 1)


def search_from(
    measure: Callable[[int], Probe], limit_bytes: int, start: int, max_micro: int = 4096
) -> SearchResult:
    """Largest micro-batch ≤ ``max_micro`` under the limit, searched from a size ``start`` known
    to be near the answer (a benchmark comparing two stacks near the autotuner's size). Going
    up from a size that fits: the next size, then the size the line through the fitting peaks
    predicts (``_line_step``), until a size that fits and a larger one that does not bracket the
    answer; going down from one that does not: steps of 1, 2, 4, …; then bisection. Two probes
    when ``start`` is the answer, four when the line is right."""
    result = SearchResult(0, limit_bytes)
    fits = _recorded(measure, result)
    start = max(1, min(start, max_micro))
    lo, hi = (start, None) if fits(start) else (0, start)
    while hi is None and lo < max_micro:  # going up from a size that fits
        b = min(lo + _line_step(result, lo), max_micro)
        lo, hi = (b, None) if fits(b) else (lo, b)
    step = 1
    while lo == 0 and hi > 1:  # going down from a size that does not
        b = max(hi - step, 1)
        lo, hi, step = (b, hi, step) if fits(b) else (0, b, 2 * step)
    return _bisected(result, fits, lo, hi or max_micro + 1)


def _line_step(result: SearchResult, lo: int) -> int:
    """How far above ``lo`` (the largest size that fits so far) the line through the fitting
    probes' peaks reaches the limit; 1 until two sizes have fit, or when the line is flat."""
    good = [p for p in result.probes if p.fits(result.limit_bytes)]
    slope = _slope(good, None)
    if len(good) < 2 or slope <= 0:
        return 1
    best = next(p for p in good if p.micro_batch == lo)
    return max(1, _samples_to(result.limit_bytes, best, slope))


def _samples_to(limit_bytes: int, best: Probe, slope: float) -> int:
    """How many samples above ``best`` the line of ``slope`` (bytes a sample, > 0) through its
    peak stays under ``limit_bytes`` (< 1: the next size is predicted not to fit)."""
    return math.floor((limit_bytes - best.peak_bytes) / slope)


def _recorded(measure: Callable[[int], Probe], result: SearchResult) -> Callable[[int], bool]:
    """``fits(b)``: probe ``b``, keep the probe in ``result``, say whether it is under the limit."""

    def fits(b: int) -> bool:
        p = measure(b)
        result.probes.append(p)
        return p.fits(result.limit_bytes)

    return fits


def _bisected(result: SearchResult, fits, lo: int, hi: int) -> SearchResult:
    """``result`` with the largest size that fits, given that ``lo`` fits (0: none did, which
    raises :class:`NothingFits`) and ``hi`` does not."""
    if lo == 0:
        err = NothingFits("micro-batch 1 does not fit")
        err.result = result
        raise err
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    result.micro_batch = lo
    return result


def accumulation_for(global_batch: int, micro: int, world: int) -> tuple[int, int]:
    """(micro, accumulation) with ``micro × world × accumulation == global_batch``: the largest
    micro-batch ≤ ``micro`` that divides the per-GPU share of the global batch."""
    per_gpu, rest = divmod(global_batch, world)
    if rest:
        raise ValueError(f"global batch {global_batch} is not a multiple of {world} GPUs")
    m = max(d for d in range(1, min(micro, per_gpu) + 1) if per_gpu % d == 0)
    return m, per_gpu // m
