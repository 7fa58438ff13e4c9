import json
import shutil
import subprocess
import sys

import pytest

from dst_train.cli import main
from tests.data.test_proassist import RECORD

KEYS = {
    "clips",
    "videos",
    "frames",
    "assistant_turns",
    "user_turns",
    "speak_frames",
    "update_frames",
    "dst_nodes",
    "dst_transitions",
    "errors",
    "warnings",
}


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
    code, out = _run(capsys, str(demo_root))
    assert code == 0 and out.strip().endswith("OK")


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
    assert "no DST annotation" in "\n".join(report["warnings"])  # its tree failed to load


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
