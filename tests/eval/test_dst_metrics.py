"""DST metrics on hand-computed cases, and the repair of an invalid decoded update."""

import pytest

from dst_train.data.dst_tree import check_state, load_dst_tsv
from dst_train.eval.dst_metrics import dst_scores, match_events
from dst_train.infer.stream import FrameTrace, StreamingAssistant
from tests.conftest import write_tsv

NS, IP, C = "not_started", "in_progress", "completed"


def _video(
    pred_states, ref_states, pred_updates=(), ref_updates=(), valid=(), fps=2.0, initial=None
):
    return {
        "pred_states": pred_states,
        "ref_states": ref_states,
        "initial_state": initial if initial is not None else dict(ref_states[0]),
        "pred_updates": list(pred_updates),
        "ref_updates": list(ref_updates),
        "valid": list(valid),
        "fps": fps,
    }


def test_state_accuracy_with_a_state_wrong_for_a_few_frames():
    # 10 frames, 3 nodes; the model marks node "1.1" completed 3 frames late
    ref = [{"1": IP, "1.1": IP, "1.2": NS}] * 4 + [{"1": IP, "1.1": C, "1.2": IP}] * 6
    pred = [dict(r) for r in ref]
    for f in (4, 5, 6):
        pred[f] = {"1": IP, "1.1": IP, "1.2": IP}
    s = dst_scores([_video(pred, ref)])
    assert s["dst_state_accuracy"] == pytest.approx(27 / 30)
    assert s["dst_joint_accuracy"] == pytest.approx(7 / 10)


def test_a_model_that_never_updates_scores_high_per_node_low_per_frame():
    # 4 nodes, the reference moves one node per frame; the model keeps the start state
    start = {"a": NS, "b": NS, "c": NS, "d": NS}
    ref = [start | {"a": C}, start | {"a": C, "b": C}, start | {"a": C, "b": C, "c": C}]
    ref = [start, *ref]
    s = dst_scores([_video([start] * 4, ref, initial=start)])
    assert s["dst_state_accuracy"] == pytest.approx(10 / 16)
    assert s["dst_joint_accuracy"] == pytest.approx(1 / 4)


def test_a_missing_node_in_the_prediction_counts_as_wrong():
    s = dst_scores([_video([{"1": IP}], [{"1": IP, "1.1": NS}])])
    assert s["dst_state_accuracy"] == 0.5 and s["dst_joint_accuracy"] == 0.0


def test_update_matching_is_a_maximum_one_to_one_matching():
    assert match_events([10, 11], [11], tolerance=2) == [(11, 11)]
    assert match_events([10], [13], tolerance=2) == []
    assert match_events([3, 20], [4, 19], tolerance=1) == [(3, 4), (20, 19)]
    # greedy nearest-first pairs 4-3 (distance 1) and then finds nothing for 1 or 5: 1 pair;
    # two pairs exist (1-3, 4-5)
    assert match_events([3, 5], [1, 4], tolerance=2) == [(3, 1), (5, 4)]


def test_update_matching_agrees_with_brute_force_on_random_cases():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(300):
        pred = sorted(rng.sample(range(30), rng.randint(0, 5)))
        ref = sorted(rng.sample(range(30), rng.randint(0, 5)))
        best = 0
        for k in range(min(len(pred), len(ref)), 0, -1):
            for ps in itertools.combinations(pred, k):
                for rs in itertools.permutations(ref, k):
                    if all(abs(p - r) <= 2 for p, r in zip(ps, rs, strict=True)):
                        best = k
                        break
                if best:
                    break
            if best:
                break
        assert len(match_events(pred, ref, tolerance=2)) == best, (pred, ref)


def test_update_f1_and_transition_accuracy_on_net_changes():
    start = {"1": NS, "1.1": NS}
    ref = [start] * 6 + [{"1": IP, "1.1": IP}] * 14 + [{"1": C, "1.1": C}] * 10
    pred = [start] * 5 + [{"1": IP, "1.1": IP}] * 7 + [{"1": C, "1.1": C}] * 18
    # predicted updates at 5 (right change, 1 frame early), 12 (completes: the reference
    # completes only at 20, 8 frames away) and 13 (a no-op update; matches nothing near)
    s = dst_scores([_video(pred, ref, [5, 12, 25], [6, 13, 20], valid=[True, True, False])])
    assert s["update_precision"] == pytest.approx(2 / 3)
    assert s["update_recall"] == pytest.approx(2 / 3)
    assert s["update_f1"] == pytest.approx(2 / 3)
    # pairs: 5-6 (both: 1 and 1.1 to in_progress: equal), 12-13 (pred completes, the reference
    # has no net change at 13): 1 of 2
    assert s["transition_accuracy"] == pytest.approx(1 / 2)
    assert s["valid_dst_ratio"] == pytest.approx(2 / 3)


def test_a_transition_is_the_change_from_the_frame_before_not_from_the_start():
    initial = {"1": NS, "1.1": NS, "1.2": NS}
    first = {"1": IP, "1.1": IP, "1.2": NS}  # frame 0's update
    second = {"1": IP, "1.1": C, "1.2": IP}
    ref = [first, first] + [second] * 8  # the second update at frame 2
    pred = [first] + [second] * 9  # ... predicted one frame early, at frame 1
    s = dst_scores([_video(pred, ref, [0, 1], [0, 2], initial=initial)])
    assert s["update_f1"] == 1.0
    # frame 1's change is frame 0's state → frame 1's: the reference's change at frame 2
    assert s["transition_accuracy"] == 1.0


def test_tolerance_uses_each_videos_fps():
    states = [{"1": NS}] * 40
    near = _video(states, states, [10], [13], fps=2.0)  # 1 s = 2 frames: 3 apart is too far
    fast = _video(states, states, [10], [13], fps=4.0)  # 1 s = 4 frames: paired
    assert dst_scores([near])["update_recall"] == 0.0
    assert dst_scores([fast])["update_recall"] == 1.0

    # the tolerance in frames is rounded, not truncated: 0.8 s at 2 fps is 2 frames (1.6)
    apart = _video(states, states, [10], [12], fps=2.0)
    assert dst_scores([apart], tolerance_s=0.8)["update_recall"] == 1.0
    assert dst_scores([apart], tolerance_s=0.7)["update_recall"] == 0.0  # 1.4: 1 frame


def test_undefined_values_are_none_not_zero():
    states = [{"1": NS}] * 5
    s = dst_scores([_video(states, states)])
    assert s["update_precision"] is None and s["update_recall"] is None
    assert s["update_f1"] is None and s["transition_accuracy"] is None
    assert s["valid_dst_ratio"] is None
    s = dst_scores([_video(states, states, [2], [], valid=[True])])
    assert s["update_precision"] == 0.0 and s["update_recall"] is None and s["update_f1"] is None


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


def test_the_timeline_plots_completed_nodes_of_the_tracked_and_the_reference_state(
    tree, tmp_path, monkeypatch
):
    """The timeline's third panel: how many nodes are completed after each frame, in the state
    the model tracked and in the annotation's (``state_before`` the frame's end)."""
    from types import SimpleNamespace

    import matplotlib.axes

    from dst_train.eval.report import plot_timeline

    series = {}
    plot = matplotlib.axes.Axes.plot

    def record(ax, x, y, *args, label=None, **kw):
        series[label] = list(y)
        return plot(ax, x, y, *args, label=label, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    done = {n: C for n in tree.order}
    states = [{**done, "1": IP, "1.1": IP, "1.1.1": IP, "1.1.2": NS, "1.2": NS, "1.2.1": NS},
              {**done, "1": IP, "1.2": NS, "1.2.1": NS}, done]  # fmt: skip
    traces = [FrameTrace(f, f * 3.0, 0.1, 0.2, state=s) for f, s in enumerate(states)]
    clip = SimpleNamespace(fps=1 / 3, video_uid="v")  # frames end at 3, 6 and 9 s
    labels = SimpleNamespace(clip=clip, responses=[1], dst_updates=[1])
    png = plot_timeline({"labels": labels, "traces": traces, "tree": tree}, tmp_path / "t.png")
    assert png.stat().st_size > 1000
    assert series["tracked"] == [0, 3, 6]
    # by 3 s action 1.1.1 (0-2 s) is done; by 6 s substep 1.1 and its actions; 9 s: not 1.2.1
    assert series["reference"] == [1, 3, 3]


def test_the_threshold_figure_has_one_panel_per_head_with_its_three_curves(tmp_path, monkeypatch):
    import matplotlib.figure
    import numpy as np

    from dst_train.eval.evaluate import sweep
    from dst_train.eval.report import plot_threshold_curves

    panels, savefig = [], matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        panels.extend((ax.get_title(), len(ax.get_lines())) for ax in fig.axes)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    rows = sweep(np.array([0.1, 0.8, 0.4, 0.9]), np.array([0, 1, 0, 1]))
    plot_threshold_curves({"speak": rows, "update": rows}, tmp_path / "c.png")
    assert panels == [("speak (val, teacher-forced)", 3), ("update (val, teacher-forced)", 3)]
    assert (tmp_path / "c.png").stat().st_size > 1000
