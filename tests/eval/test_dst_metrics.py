"""DST metrics on hand-computed cases, and the repair of an invalid decoded update."""

import pytest

from dst_train.data.dst_tree import check_state, load_dst_tsv
from dst_train.eval.dst_metrics import dst_scores, match_events
from dst_train.infer.stream import FrameTrace, StreamingAssistant
from tests.conftest import write_tsv

NS, IP, C = "not_started", "in_progress", "completed"


def _video(pred_states, ref_states, pred_updates=None, ref_updates=None, valid=()):
    return {
        "pred_states": pred_states,
        "ref_states": ref_states,
        "pred_updates": pred_updates or {},
        "ref_updates": ref_updates or {},
        "valid": list(valid),
    }


def test_state_accuracy_with_a_state_wrong_for_a_few_frames():
    # 10 frames, 3 nodes; the model marks node "1.1" completed 3 frames late
    ref = [{"1": IP, "1.1": IP, "1.2": NS}] * 4 + [{"1": IP, "1.1": C, "1.2": IP}] * 6
    pred = [dict(r) for r in ref]
    for f in (4, 5, 6):
        pred[f] = {"1": IP, "1.1": IP, "1.2": IP}
    s = dst_scores([_video(pred, ref)])
    assert s["dst_state_accuracy"] == pytest.approx(27 / 30)


def test_a_missing_node_in_the_prediction_counts_as_wrong():
    s = dst_scores([_video([{"1": IP}], [{"1": IP, "1.1": NS}])])
    assert s["dst_state_accuracy"] == 0.5


def test_update_matching_uses_the_tolerance_one_to_one():
    assert match_events([10, 11], [11], tolerance=2) == [(11, 11)]
    assert match_events([10], [13], tolerance=2) == []
    assert match_events([3, 20], [4, 19], tolerance=1) == [(3, 4), (20, 19)]


def test_update_f1_and_transition_accuracy():
    states = [{"1": NS}] * 30
    pred = {5: {"1": IP}, 12: {"1": C}, 25: {"1.1": IP}}  # 25 has no reference near
    ref = {6: {"1": IP}, 13: {"1": IP}, 20: {"1": C}}  # 13 matched but with the wrong change
    s = dst_scores([_video(states, states, pred, ref, valid=[True, True, False])], tolerance=2)
    assert s["update_precision"] == pytest.approx(2 / 3)
    assert s["update_recall"] == pytest.approx(2 / 3)
    assert s["update_f1"] == pytest.approx(2 / 3)
    assert s["transition_accuracy"] == pytest.approx(1 / 2)
    assert s["valid_dst_ratio"] == pytest.approx(2 / 3)


@pytest.fixture
def tree(tmp_path):
    rows = [
        ("STEP", 1, 0, 10, "s"),
        ("SUBSTEP", 1.1, 0, 5, "a"),
        ("ACTION", "1.1.1", 0, 2, "x"),
        ("ACTION", "1.1.2", 2, 5, "y"),
        ("SUBSTEP", 1.2, 5, 10, "b"),
        ("ACTION", "1.2.1", 5, 10, "z"),
    ]
    return load_dst_tsv(write_tsv(tmp_path / "v.tsv", rows))


def test_an_invalid_decoded_update_is_repaired_keeping_what_the_model_said(tree):
    state = {n: NS for n in tree.order}
    trace = FrameTrace(0, 0.0, 0.0, 1.0)
    # the action starts but its parents are still "not started": invalid as decoded
    new = StreamingAssistant._apply(tree, state, "1.1.1=in_progress", trace)
    assert trace.dst_valid is False and trace.repaired
    assert new["1.1.1"] == IP and new["1.1"] == IP and new["1"] == IP
    assert check_state(tree, new) == []


def test_a_valid_update_is_applied_as_is(tree):
    state = {"1": IP, "1.1": IP, "1.1.1": IP, "1.1.2": NS, "1.2": NS, "1.2.1": NS}
    trace = FrameTrace(0, 0.0, 0.0, 1.0)
    new = StreamingAssistant._apply(tree, state, "1.1.1=completed; 1.1.2=in_progress", trace)
    assert trace.dst_valid is True and not trace.repaired
    assert new == {**state, "1.1.1": C, "1.1.2": IP}


def test_unparsable_text_counts_as_invalid_and_keeps_a_valid_state(tree):
    state = {n: NS for n in tree.order}
    trace = FrameTrace(0, 0.0, 0.0, 1.0)
    new = StreamingAssistant._apply(tree, state, "9.9=done", trace)
    assert trace.dst_valid is False and check_state(tree, new) == []
