"""Speaking metrics: ProAssist's matching (window, cost) and formulas on hand-made cases."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from dst_train.eval.speaking import match_turns, speaking_scores


def exact(pairs):
    """Similarity 1 for the same text, 0 otherwise (a stand-in for embeddings in math tests)."""
    return [1.0 if a == b else 0.0 for a, b in pairs]


def silent(n):
    return [""] * n


def test_a_reply_inside_the_window_matches_and_one_outside_does_not():
    # 2 fps: window -2 s .. +4 s = reference from 4 frames before to 8 frames after the prediction
    gen, ref = silent(40), silent(40)
    gen[10], ref[18] = "a", "a"  # +8 frames: inside (edge)
    gen[30], ref[21] = "b", "b"  # -9 frames: outside -> redundant + missed
    m = match_turns(gen, ref, exact, fps=2.0)
    assert [(i, j) for i, j, _ in m.matched] == [(10, 18)]
    assert m.redundant == [30] and m.missed == [21]


def test_window_is_asymmetric():
    gen, ref = silent(30), silent(30)
    gen[10], ref[6] = "x", "x"  # -4 frames = -2 s: inside
    assert len(match_turns(gen, ref, exact).matched) == 1
    gen, ref = silent(30), silent(30)
    gen[10], ref[5] = "x", "x"  # -5 frames: outside
    m = match_turns(gen, ref, exact)
    assert not m.matched and m.redundant == [10] and m.missed == [5]


def test_the_matching_prefers_the_similar_text_then_the_nearer_frame():
    gen, ref = silent(30), silent(30)
    gen[10] = "open the box"
    ref[11], ref[13] = "close the lid", "open the box"
    m = match_turns(gen, ref, exact)
    assert [(i, j) for i, j, _ in m.matched] == [(10, 13)]  # text beats distance
    gen, ref = silent(30), silent(30)
    gen[10] = "x"
    ref[12], ref[15] = "x", "x"
    m = match_turns(gen, ref, exact)
    assert [(i, j) for i, j, _ in m.matched] == [(10, 12)] and m.missed == [15]


def test_one_to_one_two_predictions_cannot_share_a_reference():
    gen, ref = silent(20), silent(20)
    gen[5], gen[6] = "x", "x"
    ref[7] = "x"
    m = match_turns(gen, ref, exact)
    assert len(m.matched) == 1 and len(m.redundant) == 1 and not m.missed


def test_formulas_on_a_hand_counted_case():
    # video 1: 2 matches (1 correct), 1 redundant; video 2: 1 correct match, 2 missed
    gen1, ref1 = silent(40), silent(40)
    gen1[2], ref1[3] = "a", "a"  # correct
    gen1[12], ref1[13] = "b", "c"  # matched, wrong text (sim 0)
    gen1[30] = "d"  # redundant: no reference near
    gen2, ref2 = silent(40), silent(40)
    gen2[5], ref2[6] = "e", "e"
    ref2[20], ref2[35] = "f", "g"
    s = speaking_scores([match_turns(gen1, ref1, exact), match_turns(gen2, ref2, exact)])
    m_all, m, red, miss = 3, 2, 1, 2
    p, r = m / (m_all + red), m / (m_all + miss)
    assert (s["matches"], s["correct_matches"], s["redundant"], s["missed"]) == (3, 2, 1, 2)
    assert s["speak_precision"] == pytest.approx(0.5)
    assert s["speak_recall"] == pytest.approx(0.4)
    assert s["speak_f1"] == pytest.approx(2 * p * r / (p + r))
    assert s["jaccard"] == pytest.approx(2 / 6)
    assert s["missing_rate"] == pytest.approx(2 / 5)
    assert s["redundant_rate"] == pytest.approx(1 / 4)


def test_no_prediction_and_no_reference():
    s = speaking_scores([match_turns(silent(10), silent(10), exact)])
    assert s["speak_f1"] == 0.0 and s["missed"] == 0 and s["redundant"] == 0
    ref = silent(10)
    ref[3] = "x"
    s = speaking_scores([match_turns(silent(10), ref, exact)])
    assert s["missing_rate"] == 1.0 and s["speak_recall"] == 0.0


def _reference_matching(gen, ref, sim, lo, hi):
    """An independent implementation of DESIGN.md §5: dense cost matrix, infinite outside the
    window (a large number), Hungarian assignment, pairs with infinite cost dropped."""
    rows, cols = [i for i, g in enumerate(gen) if g], [j for j, r in enumerate(ref) if r]
    rg = max(abs(lo), hi)
    big = 1e9
    cost = np.full((len(rows), len(cols)), big)
    for a, i in enumerate(rows):
        for b, j in enumerate(cols):
            if lo <= j - i <= hi:
                cost[a, b] = 1 - abs(sim[(i, j)]) + abs(i - j) ** 1.5 * 0.3 / rg**1.5
    ra, ca = linear_sum_assignment(cost)
    return [(rows[a], cols[b]) for a, b in zip(ra, ca, strict=True) if cost[a, b] < big]


def test_randomized_case_agrees_with_the_formulas():
    rng = np.random.default_rng(0)
    results, counts = [], np.zeros(4)
    for _video in range(5):
        n = 120
        gen = [f"g{i}" if rng.random() < 0.12 else "" for i in range(n)]
        ref = [f"r{i}" if rng.random() < 0.1 else "" for i in range(n)]
        sim = {(i, j): float(rng.uniform(-1, 1)) for i in range(n) for j in range(n)}

        def similarity(pairs, _g=gen, _r=ref, _s=sim):
            index = {(_g[i], _r[j]): _s[(i, j)] for i, j in _s if _g[i] and _r[j]}
            return [index[p] for p in pairs]

        m = match_turns(gen, ref, similarity, fps=2.0)
        expected = _reference_matching(gen, ref, sim, -4, 8)
        assert sorted((i, j) for i, j, _ in m.matched) == sorted(expected)
        m_all = len(expected)
        correct = sum(1 for i, j in expected if sim[(i, j)] > 0.5)
        red = sum(1 for g in gen if g) - m_all
        miss = sum(1 for r in ref if r) - m_all
        counts += (m_all, correct, red, miss)
        results.append(m)
    m_all, m, red, miss = counts
    s = speaking_scores(results)
    p, r = m / (m_all + red), m / (m_all + miss)
    assert s["speak_precision"] == pytest.approx(p)
    assert s["speak_recall"] == pytest.approx(r)
    assert s["speak_f1"] == pytest.approx(2 * p * r / (p + r))
    assert s["jaccard"] == pytest.approx(m / (m_all + miss + red))
    assert s["missing_rate"] == pytest.approx(miss / (m_all + miss))
    assert s["redundant_rate"] == pytest.approx(red / (m_all + red))
