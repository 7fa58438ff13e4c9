"""DST metrics: how well the tracked task state follows the annotation (ours; ProAssist has none).

* ``dst_state_accuracy`` — over every frame and node, the share of nodes whose tracked state
  (after the frame) equals the reference state at the frame's end;
* ``dst_joint_accuracy`` — the share of frames where *every* node is right (a model that never
  updates still gets most nodes right; it gets few frames right);
* ``update_precision/recall/f1`` — predicted update frames vs reference update frames, paired
  one-to-one at most ``tolerance_s`` seconds apart (``round(tolerance_s * fps)`` frames, each
  video its own fps) by a *maximum* matching (most pairs; among those, least total distance);
* ``transition_accuracy`` — among paired updates, the share whose *net* change (state after
  the frame minus state before it, parents included) equals the reference's net change;
* ``valid_dst_ratio`` — the share of decoded updates that gave a hierarchically valid state
  before any repair.

A value with nothing to count (no predicted update → precision; no reference update → recall;
no pair → transition accuracy; no decoded update → valid ratio) is None, not 0.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def match_events(pred: list[int], ref: list[int], tolerance: int) -> list[tuple[int, int]]:
    """Maximum one-to-one pairing of frames at most ``tolerance`` apart; among maximum
    pairings, the one with the least total distance. Returns sorted (pred, ref) pairs."""
    if not pred or not ref:
        return []
    p, r = np.array(pred)[:, None], np.array(ref)[None, :]
    dist = np.abs(p - r).astype(float)
    far = dist > tolerance
    # a missing pair costs more than any sum of real distances: count first, then distance
    dist[far] = (tolerance + 1) * (len(pred) + len(ref)) + 1
    rows, cols = linear_sum_assignment(dist)
    return sorted((pred[i], ref[j]) for i, j in zip(rows, cols, strict=True) if not far[i, j])


def net_change(before: dict[str, str], after: dict[str, str]) -> dict[str, str]:
    return {k: s for k, s in after.items() if before.get(k) != s}


def dst_scores(videos: list[dict], tolerance_s: float = 1.0) -> dict:
    """``videos``: dicts with ``pred_states``/``ref_states`` (one state dict per frame, after
    the frame), ``initial_state`` (before the first frame), ``pred_updates``/``ref_updates``
    (frame indices into the state lists), ``valid`` (one bool per decoded update), ``fps``."""
    correct = total = joint = frames = 0
    n_pred = n_ref = matched = exact = 0
    valid: list[bool] = []
    for v in videos:
        for p, r in zip(v["pred_states"], v["ref_states"], strict=True):
            right = sum(p.get(k) == s for k, s in r.items())
            correct += right
            total += len(r)
            joint += right == len(r)
            frames += 1
        tolerance = round(tolerance_s * v["fps"])
        pairs = match_events(sorted(v["pred_updates"]), sorted(v["ref_updates"]), tolerance)
        n_pred += len(v["pred_updates"])
        n_ref += len(v["ref_updates"])
        matched += len(pairs)
        exact += sum(
            _change_at(v["pred_states"], v["initial_state"], p)
            == _change_at(v["ref_states"], v["initial_state"], r)
            for p, r in pairs
        )
        valid += v["valid"]
    prec = matched / n_pred if n_pred else None
    rec = matched / n_ref if n_ref else None
    f1 = (
        None if prec is None or rec is None else (2 * prec * rec / (prec + rec) if matched else 0.0)
    )
    return {
        "dst_state_accuracy": correct / total if total else None,
        "dst_joint_accuracy": joint / frames if frames else None,
        "update_precision": prec,
        "update_recall": rec,
        "update_f1": f1,
        "transition_accuracy": exact / matched if matched else None,
        "valid_dst_ratio": sum(valid) / len(valid) if valid else None,
        "updates_predicted": n_pred,
        "updates_reference": n_ref,
    }


def _change_at(states: list[dict], initial: dict, frame: int) -> dict[str, str]:
    return net_change(states[frame - 1] if frame > 0 else initial, states[frame])
