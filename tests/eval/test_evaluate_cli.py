"""``dst-train evaluate`` end to end on a (random) tiny model folder: report, table, plots."""

import json
import subprocess
import sys

import torch

from dst_train.eval.report import REPORT_KEYS
from dst_train.model.backbone import load_image_processor, load_tokenizer
from dst_train.model.build import Precision, build_model
from tests.conftest import tiny_run_config
from tests.engine.helpers import REPO


def test_evaluate_writes_the_report_with_a_baseline_row(demo_root, tiny_model_dir, tmp_path):
    cfg = tiny_run_config(demo_root, tiny_model_dir)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.head_config(), Precision("fp32", "sdpa"))
    folder = tmp_path / "hf"
    model.backbone.hf.save_pretrained(folder)  # a folder laid out like `dst-train convert`'s
    model.save_heads(folder)
    load_tokenizer(cfg.model.arch).save_pretrained(folder)
    load_image_processor(cfg.model.arch).save_pretrained(folder)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dst_train.cli",
            "evaluate",
            str(folder),
            "--data",
            str(demo_root),
            "--out",
            str(tmp_path / "eval"),
            "--baseline",
            "--max-new-tokens",
            "4",
            "--stream-batch",
            "3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| speak_f1 |" in proc.stdout and "untrained baseline" in proc.stdout
    report = json.loads((tmp_path / "eval/report.json").read_text())
    for key in ("metrics", "baseline_metrics"):
        assert set(REPORT_KEYS) <= set(report[key])
        assert all(report[key][k] is None or 0 <= report[key][k] for k in REPORT_KEYS)
    assert report["max_new_tokens"] == 4 and report["stream_batch"] == 3
    assert 0 < report["model_thresholds"]["speak"] < 1
    traces = list((tmp_path / "eval/traces").glob("*.jsonl"))
    assert len(traces) == report["clips"]
    first = json.loads(traces[0].read_text().splitlines()[0])
    assert {"frame", "speak_prob", "update_prob", "response", "dst_text", "state"} <= set(first)
    for png in ("timeline.png", "threshold_curves.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 1000
    assert "| metric |" in (tmp_path / "eval/report.md").read_text()


def test_evaluate_rejects_a_stream_batch_below_one(tmp_path, capsys):
    from dst_train.cli import main

    assert main(["evaluate", str(tmp_path), "--data", str(tmp_path), "--stream-batch", "0"]) == 2
    assert "error: --stream-batch 0" in capsys.readouterr().err


def test_evaluate_names_a_folder_that_is_not_a_model(demo_root, tmp_path, capsys):
    from dst_train.cli import main

    assert main(["evaluate", str(demo_root), "--data", str(demo_root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "dst_config.json" in err and "dst-train convert" in err
    assert main(["evaluate", str(tmp_path / "nothing"), "--data", str(demo_root)]) == 2
    assert "no such model folder" in capsys.readouterr().err


def test_evaluate_names_a_bad_dataset_or_split_before_loading(demo_root, tmp_path, capsys):
    from dst_train.cli import main
    from dst_train.model.dst_model import CONFIG_FILE, HEADS_FILE

    folder = tmp_path / "hf"  # passes the folder check; nothing in it is loaded before the data
    folder.mkdir()
    (folder / CONFIG_FILE).write_text("{}")
    (folder / HEADS_FILE).write_bytes(b"")
    cases = [
        (["--data", str(tmp_path / "nodata")], "not a dataset root"),
        (["--data", str(demo_root), "--split", "nosuch"], "no prepared file for split 'nosuch'"),
    ]
    for extra, message in cases:
        assert main(["evaluate", str(folder), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err
        assert not (tmp_path / "eval").exists()  # nothing written for a run that cannot start
