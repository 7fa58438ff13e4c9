import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dst_train.cli import main
from dst_train.data.dataset import DatasetPaths
from dst_train.data.validate import validate_dataset
from tests.data.test_proassist import RECORD

KEYS = {
    "clips",
    "videos",
    "frames",
    "assistant_turns",
    "user_turns",
    "speak_frames",
    "update_frames",
    "dst_files",
    "dst_nodes",
    "dst_transitions",
    "errors",
    "warnings",
}


# a task tree whose action starts before its substep: repaired (a warning) or refused
ACTION_BEFORE_ITS_PARENT = [
    ("STEP", "1", 0, 10, "build"),
    ("SUBSTEP", "1.1", 2, 6, "base"),
    ("ACTION", "1.1.1", 1, 3, "screw"),
]


def _run(capsys, *args):
    code = main(["validate-data", *args])
    return code, capsys.readouterr().out


def test_demo_root_validates_clean(demo_root, capsys):
    code, out = _run(capsys, str(demo_root), "--json")
    report = json.loads(out)
    assert code == 0 and KEYS <= set(report)
    assert report["errors"] == [] and report["videos"] == 6
    assert report["speak_frames"] > 0 and report["update_frames"] > 0
    assert report["dst_transitions"] > report["dst_nodes"] > 0
    assert report["dst_files"] == len(list(DatasetPaths.from_root(demo_root).dst_dir.glob("*.tsv")))
    code, out = _run(capsys, str(demo_root))
    assert code == 0 and out.strip().endswith("OK")
    from dst_train.data.proassist import read_prepared

    per_split = {
        p.stem: len(read_prepared(p)) for p in sorted((demo_root / "prepared").glob("*.jsonl"))
    }
    assert sum(per_split.values()) == report["clips"]
    for split, n in per_split.items():  # the summary's "(per split: {...})"
        assert f"'{split}': {n}" in out


def test_proassist_shaped_sample_without_frames_or_dst(tmp_path, capsys):
    path = tmp_path / "prepared.jsonl"
    path.write_text(json.dumps(RECORD) + "\n")
    code, out = _run(capsys, "--prepared", str(path), "--no-frames", "--json")
    report = json.loads(out)
    assert code == 0, report["errors"]
    assert (
        report["clips"],
        report["frames"],
        report["assistant_turns"],
        report["user_turns"],
        report["speak_frames"],
        report["update_frames"],
    ) == (1, 8, 1, 1, 1, 0)


def _validate_record(tmp_path, capsys, record) -> tuple[int, dict, Path]:
    """``record`` alone in a prepared file, validated without frames: (exit code, report, file)."""
    path = tmp_path / "prepared.jsonl"
    path.write_text(json.dumps(record) + "\n")
    code, out = _run(capsys, "--prepared", str(path), "--no-frames", "--json")
    return code, json.loads(out), path


# RECORD's assistant turn follows frame 5 (2.5 s at 2 fps): its time may be a frame either side
# of it, [2.0 s, 3.5 s); outside, the turn and the frame it is placed after disagree
@pytest.mark.parametrize("time, warned", [(2.9, False), (2.0, False), (3.49, False),
                                          (1.99, True), (3.5, True)])  # fmt: skip
def test_an_assistant_turn_far_from_its_frame_is_a_warning(tmp_path, capsys, time, warned):
    record = copy.deepcopy(RECORD)
    record["conversation"][4]["time"] = time
    code, report, path = _validate_record(tmp_path, capsys, record)
    warning = f"{path}:1: assistant turn at {time:g} s follows frame 5 (2.5 s)"
    assert code == 0 and report["warnings"] == ([warning] if warned else [])


def test_an_assistant_turn_before_the_first_frame_is_a_warning(tmp_path, capsys):
    record = copy.deepcopy(RECORD)
    hello = {"role": "assistant", "time": 0.5, "content": "Hi.", "labels": "initiative"}
    record["conversation"].insert(1, hello)  # before any frames turn: no frame to speak at
    code, report, path = _validate_record(tmp_path, capsys, record)
    assert code == 0 and report["assistant_turns"] == 2
    assert report["warnings"] == [
        f"{path}:1: 1 assistant turn(s) before the first frame (no speak label)"
    ]


@pytest.mark.parametrize("end_s, hidden", [(3.2, [6]), (2.2, [])])
def test_frames_no_turn_shows_are_a_warning_that_names_the_dst_updates_there(
    tmp_path, capsys, end_s, hidden
):
    """Frame 6 (3.0-3.5 s) is in no frames turn: training never shows it, so a DST update
    labelled there never reaches a training sequence (evaluation streams every frame)."""
    from tests.conftest import write_tsv

    record = copy.deepcopy(RECORD)
    record["conversation"][5] = {"role": "frames", "start": 7, "end": 10}
    rows = [("STEP", "1", 0, 10, "build"), ("SUBSTEP", "1.1", 1, end_s, "base"),
            ("ACTION", "1.1.1", 1, end_s, "screw")]  # fmt: skip
    tsv = write_tsv(tmp_path / "vid_a.tsv", rows)
    path = tmp_path / "prepared.jsonl"
    path.write_text(json.dumps(record) + "\n")
    code, out = _run(
        capsys, "--prepared", str(path), "--dst-tsv", str(tsv), "--no-frames", "--json"
    )
    report = json.loads(out)
    warning = f"{path}:1: frames turns cover 7 of the clip's 8 frames"
    if hidden:
        warning += f"; DST updates at frames {hidden} fall on no frame shown (never trained)"
    assert code == 0 and report["warnings"] == [warning]


def test_a_clip_whose_video_has_no_dst_file_is_named_once_dst_is_given(tmp_path, capsys):
    """DST files given one by one (--dst-tsv) or as a folder (--dst-dir, even an empty one): a
    clip of a video none of them annotates is a warning; with no DST given at all, none."""
    from tests.conftest import write_tsv

    path = tmp_path / "prepared.jsonl"
    path.write_text(json.dumps(RECORD) + "\n")
    rows = [("STEP", "1", 0, 2, "x"), ("SUBSTEP", "1.1", 0, 2, "y"), ("ACTION", "1.1.1", 0, 2, "z")]
    tsv = write_tsv(tmp_path / "other_video.tsv", rows)
    (tmp_path / "empty").mkdir()
    missing = f"{path}:1: no DST annotation for video 'vid_a'"
    for given in (["--dst-tsv", str(tsv)], ["--dst-dir", str(tmp_path / "empty")], []):
        code, out = _run(capsys, "--prepared", str(path), "--no-frames", *given, "--json")
        warnings = json.loads(out)["warnings"]
        assert code == 0 and (missing in warnings) == bool(given), (given, warnings)


def _broken_copy(demo_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(demo_root, root)
    test_file = root / "prepared" / "test.jsonl"
    lines = test_file.read_text().splitlines()
    original = lines[0]
    rec = json.loads(original)
    rec["end_frame_idx"] += 1000  # past the end of its frames file
    lines[0] = json.dumps(rec)
    lines.append("{broken json")
    test_file.write_text("\n".join(lines) + "\n")
    (root / "prepared" / "val.jsonl").write_text(
        (root / "prepared" / "val.jsonl").read_text() + original + "\n"
    )  # same video twice
    tsv = sorted((root / "dst").glob("*.tsv"))[0]
    tsv.write_text(tsv.read_text() + "ACTION\t9.9.9\t1\t2\torphan\n")
    return root, len(lines)


def test_every_problem_is_reported_with_its_place(demo_root, tmp_path, capsys):
    root, n_lines = _broken_copy(demo_root, tmp_path)
    code, out = _run(capsys, str(root), "--json")
    report = json.loads(out)
    assert code == 1
    errors = "\n".join(report["errors"])
    assert "test.jsonl:1: end_frame_idx" in errors and "past the end" in errors
    assert f"test.jsonl:{n_lines}: invalid JSON" in errors
    # the video's clips are named by file and line in each split
    assert "appears in several splits: test (" in errors and "test.jsonl:1), val (" in errors
    assert f"val.jsonl:{len((root / 'prepared' / 'val.jsonl').read_text().splitlines())})" in errors
    assert ".tsv:" in errors and "parent '9.9' of '9.9.9' is not defined" in errors
    # the clips of the video whose tree failed to load, and only those, lack an annotation
    broken = sorted((root / "dst").glob("*.tsv"))[0].stem
    unannotated = {w.split("video ")[-1] for w in report["warnings"] if "no DST annotation" in w}
    assert unannotated == {repr(broken)}


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["validate-data"]) == 2
    assert main(["validate-data", str(tmp_path)]) == 2  # not a dataset root
    with pytest.raises(SystemExit) as e:
        main(["validate-data", "--span-policy", "nope"])
    assert e.value.code == 2


def test_console_script_exit_codes(demo_root, tmp_path):
    exe = [sys.executable, "-m", "dst_train.cli", "validate-data"]
    assert subprocess.run([*exe, str(demo_root)], capture_output=True).returncode == 0
    assert (
        subprocess.run(
            [*exe, "--prepared", str(tmp_path / "x.jsonl"), "--no-frames"], capture_output=True
        ).returncode
        == 1
    )


def _moved_layout(demo_root, tmp_path):
    """The demo's files in three unrelated folders, so nothing can be guessed from a root."""
    prepared = tmp_path / "clips" / "train.jsonl"
    prepared.parent.mkdir()
    shutil.copy(demo_root / "prepared" / "train.jsonl", prepared)
    shutil.copytree(demo_root / "frames", tmp_path / "media" / "frames")
    shutil.copytree(demo_root / "dst", tmp_path / "annotations")
    return prepared, tmp_path / "media", tmp_path / "annotations"


def test_frames_root_and_dst_dir_options_are_where_files_are_found(demo_root, tmp_path, capsys):
    prepared, media, annotations = _moved_layout(demo_root, tmp_path)
    code, out = _run(capsys, "--prepared", str(prepared), "--json")
    guessed = json.loads(out)  # frames looked for under tmp_path (the ProAssist layout guess)
    assert code == 1 and "frames file does not exist" in "\n".join(guessed["errors"])
    args = ["--prepared", str(prepared), "--frames-root", str(media), "--json"]
    code, out = _run(capsys, *args)
    no_dst = json.loads(out)
    assert code == 0 and no_dst["frames"] > 0 and no_dst["update_frames"] == 0
    code, out = _run(capsys, *args, "--dst-dir", str(annotations))
    full = json.loads(out)
    assert code == 0 and full["update_frames"] > 0 and full["dst_nodes"] > 0
    assert (full["clips"], full["frames"]) == (no_dst["clips"], no_dst["frames"])


def test_dst_tsv_alone_and_the_span_policy(tmp_path, capsys):
    from tests.conftest import write_tsv

    tsv = write_tsv(tmp_path / "v.tsv", ACTION_BEFORE_ITS_PARENT)
    code, out = _run(capsys, "--dst-tsv", str(tsv), "--json")
    repaired = json.loads(out)
    assert code == 0 and repaired["dst_nodes"] == 3 and repaired["clips"] == 0
    # repaired to the action's [1, 3] s: each node starts at 1 s and completes at 3 s
    assert (repaired["dst_files"], repaired["dst_transitions"]) == (1, 6)
    assert any("outside its annotated span" in w for w in repaired["warnings"])
    code, out = _run(capsys, "--dst-tsv", str(tsv), "--span-policy", "error", "--json")
    refused = json.loads(out)
    assert code == 1 and refused["errors"][0].startswith(f"{tsv}:3: error: children of '1.1'")


def _a_bad_frame_inside_a_clip(demo_root, tmp_path) -> tuple[Path, int]:
    """A copy of the demo root whose first train clip has a frame that is not a JPEG, halfway
    between its first and last: (root, that frame's index)."""
    from dst_train.data.proassist import FrameReader, write_frames

    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    clip = json.loads((root / "prepared" / "train.jsonl").read_text().splitlines()[0])
    arrow = root / clip["frames_file"]
    frames = FrameReader(arrow).encoded(0, len(FrameReader(arrow)))
    middle = (clip["start_frame_idx"] + clip["end_frame_idx"]) // 2
    frames[middle] = "bm90IGEgSlBFRw=="  # base64 of "not a JPEG"
    arrow.unlink()
    write_frames(arrow, frames)
    return root, middle


def test_validate_dataset_from_python_checks_frames_and_repairs_spans_quietly(
    demo_root, tmp_path, capsys
):
    """The defaults of the Python call: frames are checked (each clip's first and last), spans
    outside their parent are repaired with a warning, nothing is printed."""
    from tests.conftest import write_tsv

    root, middle = _a_bad_frame_inside_a_clip(demo_root, tmp_path)
    paths = DatasetPaths.from_root(root)
    tsv = write_tsv(tmp_path / "outside.tsv", ACTION_BEFORE_ITS_PARENT)
    report = validate_dataset(paths.prepared, paths.frames_root, paths.dst_dir, [tsv])
    assert report.ok, report.errors[:3]  # the bad frame is in no clip's first or last place
    assert any("outside its annotated span" in w for w in report.warnings)
    assert capsys.readouterr() == ("", "")  # no progress bars
    deep = validate_dataset(paths.prepared, paths.frames_root, paths.dst_dir, deep=True)
    assert any(f"[{middle}]: not a base64-encoded image" in e for e in deep.errors)
    no_frames = validate_dataset(paths.prepared, None, paths.dst_dir)  # checked: a root is needed
    assert no_frames.errors and "no frames root given" in no_frames.errors[0]


def test_deep_decodes_every_frame_a_clip_uses(demo_root, tmp_path, capsys):
    root, middle = _a_bad_frame_inside_a_clip(demo_root, tmp_path)
    code, out = _run(capsys, str(root), "--json")
    assert code == 0, json.loads(out)["errors"]  # only each clip's first and last frames
    code, out = _run(capsys, str(root), "--deep", "--json")
    errors = json.loads(out)["errors"]
    assert code == 1 and any(f"[{middle}]: not a base64-encoded image" in e for e in errors)


def test_the_summary_lists_twenty_problems_of_each_kind_and_counts_the_rest():
    from dst_train.data.validate import ValidationReport

    report = ValidationReport(errors=[f"e{i}" for i in range(23)], warnings=["w0"])
    lines = report.summary().splitlines()
    assert lines[lines.index("errors: 23") + 1 : lines.index("warnings: 1")] == [
        *(f"  e{i}" for i in range(20)),
        "  ... and 3 more (see --json)",
    ]
    assert lines[-2:] == ["  w0", "FAILED"]
    assert "speak frames 0 (-)" in report.summary()  # no frames: no rate
    exactly = ValidationReport(errors=[f"e{i}" for i in range(20)], frames=4, speak_frames=1)
    assert "more (see --json)" not in exactly.summary()
    assert "speak frames 1 (25.0%)" in exactly.summary()
    assert ValidationReport().summary().endswith("errors: 0\nwarnings: 0\nOK")
