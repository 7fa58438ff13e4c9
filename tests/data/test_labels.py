import math

import pytest

from dst_train.data.dst_tree import load_dst_tsv
from dst_train.data.labels import build_clip_labels
from dst_train.data.proassist import parse_clip
from tests.conftest import write_tsv


def _clip(start=0, end=8):
    return parse_clip(
        {
            "dataset": "d",
            "video_uid": "v",
            "clip_idx": 0,
            "frames_file": "frames/v.arrow",
            "start_frame_idx": start,
            "end_frame_idx": end,
            "fps": 2,
            "conversation": [
                {"role": "system", "content": "sys"},
                {"role": "assistant", "time": 0.0, "content": "hello"},  # before any frame
                {"role": "frames", "start": start, "end": 3},
                {"role": "user", "time": 1.2, "content": "what now?"},
                {"role": "frames", "start": 3, "end": 4},
                {"role": "assistant", "time": 1.8, "content": "screw it"},
                {"role": "frames", "start": 4, "end": end},
            ],
        },
        "test:1",
    )


def _tree(tmp_path):
    # frame f covers [f/2, (f+1)/2) seconds
    return load_dst_tsv(
        write_tsv(
            tmp_path / "v.tsv",
            [
                ("STEP", "1", "", "", "s"),
                ("SUBSTEP", "1.1", "", "", "u"),
                ("ACTION", "1.1.1", 0.3, 1.6, "a"),  # in_progress in frame 0, completed in frame 3
                ("ACTION", "1.1.2", 1.7, 1.7, "b"),  # instantaneous, frame 3
                ("SUBSTEP", "1.2", "", "", "w"),
                ("ACTION", "1.2.1", 2.5, 3.2, "c"),  # frames 5 and 6
            ],
        )
    )


def test_hand_computed_labels(tmp_path):
    labels = build_clip_labels(_clip(), _tree(tmp_path))
    assert labels.speak == [0, 0, 0, 1, 0, 0, 0, 0]
    assert labels.update == [1, 0, 0, 1, 0, 1, 1, 0]
    assert labels.responses == {3: ["screw it"]}
    assert labels.pre_frame_assistant_turns == 1
    assert labels.dst_updates == {
        0: "1=in_progress; 1.1=in_progress; 1.1.1=in_progress",
        3: "1.1=completed; 1.1.1=completed; 1.1.2=completed",
        5: "1.2=in_progress; 1.2.1=in_progress",  # step 1 is already in progress
        6: "1=completed; 1.2=completed; 1.2.1=completed",
    }
    assert set(labels.initial_state.values()) == {"not_started"}
    # streaming layout: the DST turn comes right after its frame, before the reply
    kinds = [(s.kind, s.start, s.end, s.frame) for s in labels.segments]
    assert kinds == [
        ("system", -1, -1, None),
        ("assistant", -1, -1, None),
        ("frames", 0, 1, None),
        ("dst", -1, -1, 0),
        ("frames", 1, 3, None),
        ("user", -1, -1, 2),
        ("frames", 3, 4, None),
        ("dst", -1, -1, 3),
        ("assistant", -1, -1, 3),
        ("frames", 4, 6, None),
        ("dst", -1, -1, 5),
        ("frames", 6, 7, None),
        ("dst", -1, -1, 6),
        ("frames", 7, 8, None),
    ]


def test_clip_starting_later_gets_the_state_at_its_start(tmp_path):
    clip = _clip(start=2)
    labels = build_clip_labels(clip, _tree(tmp_path))
    assert labels.initial_state["1.1.1"] == "in_progress"  # began in frame 0, before the clip
    assert labels.initial_state["1.1"] == "in_progress"
    assert labels.update == [0, 1, 0, 1, 1, 0]  # frames 2..7
    assert labels.speak == [0, 1, 0, 0, 0, 0]


def test_without_dst_only_speak_labels(tmp_path):
    labels = build_clip_labels(_clip(), None)
    assert labels.update is None and labels.initial_state is None
    assert not any(s.kind == "dst" for s in labels.segments)


def test_a_transition_at_exactly_the_clip_start_is_the_first_frames_update(tmp_path):
    """Clip from frame 2 (1.0 s at 2 fps); an action starts at exactly 1.0 s: the clip begins
    before it (not started) and its first frame carries the update."""
    tree = load_dst_tsv(
        write_tsv(
            tmp_path / "v.tsv",
            [
                ("STEP", "1", "", "", "s"),
                ("SUBSTEP", "1.1", "", "", "u"),
                ("ACTION", "1.1.1", 1.0, 2.2, "a"),
            ],
        )
    )
    labels = build_clip_labels(_clip(start=2), tree)
    assert set(labels.initial_state.values()) == {"not_started"}
    assert labels.update == [1, 0, 1, 0, 0, 0]  # starts in frame 2, completes in frame 4 (2.2 s)
    assert labels.dst_updates[2] == "1=in_progress; 1.1=in_progress; 1.1.1=in_progress"


def _clip_at_3_fps(start: int, end: int):
    return parse_clip(
        {
            "dataset": "d",
            "video_uid": "v",
            "clip_idx": start // 5,
            "frames_file": "frames/v.arrow",
            "start_frame_idx": start,
            "end_frame_idx": end,
            "fps": 3,
            "conversation": [
                {"role": "system", "content": "sys"},
                {"role": "frames", "start": start, "end": end},
            ],
        },
        f"test:{start}",
    )


@pytest.mark.parametrize(
    "begins, first_clip, second_clip",
    [
        (5 / 3, [0, 0, 0, 0, 0], [1, 0, 0, 0, 1]),  # the second clip's start: its first frame
        # a hair before: the first clip's last frame, though time x fps rounds up to frame 5
        (math.nextafter(5 / 3, 0), [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]),
    ],
)
def test_a_transition_belongs_to_the_clip_whose_time_span_holds_it(
    tmp_path, begins, first_clip, second_clip
):
    """Clips [0, 5) and [5, 10) of one video at 3 fps (frame f covers [f/3, (f+1)/3) s): each
    transition is an update of exactly one clip, the one whose [start, end) seconds hold it."""
    assert int(math.nextafter(5 / 3, 0) * 3) == 5  # the rounding the clamp is there for
    rows = [("STEP", "1", "", "", "s"), ("SUBSTEP", "1.1", "", "", "u")]
    rows.append(("ACTION", "1.1.1", repr(begins), 3.1, "a"))  # completes in frame 9
    tree = load_dst_tsv(write_tsv(tmp_path / "v.tsv", rows))
    assert build_clip_labels(_clip_at_3_fps(0, 5), tree).update == first_clip
    assert build_clip_labels(_clip_at_3_fps(5, 10), tree).update == second_clip


@pytest.mark.parametrize(
    "spans",
    [
        [(0, 3), (2, 4), (4, 8)],  # overlapping
        [(0, 3), (4, 8), (3, 4)],  # out of order
        [(0, 3), (3, 4), (4, 9)],  # past the clip's end
        [(1, 3), (3, 4), (4, 8)],  # fine: a clip may start without frames
    ],
)
def test_overlapping_or_out_of_order_frames_turns_are_refused(spans):
    from dst_train.data.proassist import DataFormatError

    record = {
        "dataset": "d", "video_uid": "v", "clip_idx": 0, "frames_file": "frames/v.arrow",
        "start_frame_idx": 0, "end_frame_idx": 8, "fps": 2,
        "conversation": [{"role": "frames", "start": a, "end": b} for a, b in spans],
    }  # fmt: skip
    if spans[0][0] == 1:
        assert parse_clip(record, "x.jsonl:7").num_frames == 8
        return
    with pytest.raises(DataFormatError, match=r"^x\.jsonl:7: conversation\[\d\]: frames .* out of"):
        parse_clip(record, "x.jsonl:7")
