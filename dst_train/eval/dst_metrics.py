"""DST metrics: how well the tracked task state follows the annotation.

* ``dst_state_accuracy`` — over every frame and node, the share of nodes whose tracked state
  (after the frame) equals the reference state at the frame's end;
* ``update_precision/recall/f1`` — predicted update frames vs reference update frames, matched
  one-to-one in time order when at most ``tolerance`` frames apart;
* ``transition_accuracy`` — among matched update pairs, the share whose decoded change set
  equals the reference change set exactly;
* ``valid_dst_ratio`` — the share of decoded updates that gave a hierarchically valid state
  before any repair.
"""

from __future__ import annotations


def match_events(pred: list[int], ref: list[int], tolerance: int) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of sorted frame lists within ``tolerance`` frames, nearest
    first (ties: earlier). Returns (pred, ref) pairs."""
    candidates = sorted((abs(p - r), r, p) for p in pred for r in ref if abs(p - r) <= tolerance)
    used_p, used_r, pairs = set(), set(), []
    for _, r, p in candidates:
        if p not in used_p and r not in used_r:
            used_p.add(p)
            used_r.add(r)
            pairs.append((p, r))
    return sorted(pairs)


def dst_scores(videos: list[dict], tolerance: int = 2) -> dict:
    """``videos``: dicts with ``pred_states``/``ref_states`` (one state dict per frame),
    ``pred_updates``/``ref_updates`` ({frame: {node: state}}), ``valid`` (list of bools, one per
    decoded update)."""
    correct = total = 0
    tp = n_pred = n_ref = exact = matched = 0
    valid = []
    for v in videos:
        for p, r in zip(v["pred_states"], v["ref_states"], strict=True):
            correct += sum(p.get(k) == s for k, s in r.items())
            total += len(r)
        pairs = match_events(sorted(v["pred_updates"]), sorted(v["ref_updates"]), tolerance)
        tp += len(pairs)
        n_pred += len(v["pred_updates"])
        n_ref += len(v["ref_updates"])
        exact += sum(v["pred_updates"][p] == v["ref_updates"][r] for p, r in pairs)
        matched += len(pairs)
        valid += v["valid"]
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_ref if n_ref else 0.0
    return {
        "dst_state_accuracy": correct / total if total else 0.0,
        "update_precision": prec,
        "update_recall": rec,
        "update_f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "transition_accuracy": exact / matched if matched else 0.0,
        "valid_dst_ratio": sum(valid) / len(valid) if valid else 0.0,
        "updates_predicted": n_pred,
        "updates_reference": n_ref,
    }
