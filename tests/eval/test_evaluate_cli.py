"""``dst-train evaluate`` end to end on a (random) tiny model folder: report, table, plots."""

import json
import re
import subprocess
import sys

import pytest
import torch

from dst_train.eval.report import REPORT_KEYS
from dst_train.model.backbone import load_image_processor, load_tokenizer
from dst_train.model.build import Precision, build_model
from tests.conftest import tiny_run_config
from tests.engine.helpers import REPO


@pytest.fixture(scope="module")
def model_folder(demo_root, tiny_model_dir, tmp_path_factory):
    """A random tiny model saved the way `dst-train convert` lays its folder out. Its decision
    heads vary per frame, so it differs from the untrained baseline `--baseline` builds (the same
    seed: built alike, the two would be bit-identical and any comparison vacuous)."""
    cfg = tiny_run_config(demo_root, tiny_model_dir)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.head_config(), Precision("fp32", "sdpa"))
    torch.manual_seed(1)
    for head in (model.speak_head, model.update_head):
        torch.nn.init.normal_(head.net[-1].weight, std=0.3)
    folder = tmp_path_factory.mktemp("eval-model") / "hf"
    model.backbone.hf.save_pretrained(folder)
    model.save_heads(folder)
    load_tokenizer(cfg.model.arch).save_pretrained(folder)
    load_image_processor(cfg.model.arch).save_pretrained(folder)
    return folder


def test_evaluate_writes_the_report_with_a_baseline_row(demo_root, model_folder, tmp_path):
    folder = model_folder
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
    # the model is not the baseline: other decisions, other numbers
    preds = {n: (tmp_path / f"eval/{n}predictions.jsonl").read_text() for n in ("", "baseline_")}
    assert preds[""] != preds["baseline_"]
    assert any(report["metrics"][k] != report["baseline_metrics"][k] for k in REPORT_KEYS)
    assert report["max_new_tokens"] == 4 and report["stream_batch"] == 3
    assert 0 < report["model_thresholds"]["speak"] < 1
    traces = list((tmp_path / "eval/traces").glob("*.jsonl"))
    assert len(traces) == report["clips"]
    first = json.loads(traces[0].read_text().splitlines()[0])
    assert {"frame", "speak_prob", "update_prob", "response", "dst_text", "state"} <= set(first)
    for png in ("timeline.png", "threshold_curves.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 1000
    assert "| metric |" in (tmp_path / "eval/report.md").read_text()
    # ProAssist's embedding model by default, and the predictions in the score format:
    # `dst-train score` on them gives the report's speaking numbers
    assert "all-mpnet-base-v2" in report["embedding_model"]
    from dst_train.eval.score import SCORE_KEYS, read_score_file, score_videos
    from dst_train.eval.speaking import SentenceSimilarity

    videos = read_score_file(tmp_path / "eval/predictions.jsonl")
    assert len(videos) == report["clips"]
    assert (tmp_path / "eval/baseline_predictions.jsonl").is_file()
    again = score_videos(videos, SentenceSimilarity(report["embedding_model"]))
    for key in SCORE_KEYS:
        assert again[key] == pytest.approx(report["metrics"][key], abs=1e-9), key


def test_evaluate_names_a_folder_that_is_not_a_model(demo_root, tmp_path, capsys):
    from dst_train.cli import main

    assert main(["evaluate", str(demo_root), "--data", str(demo_root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "dst_config.json" in err and "dst-train convert" in err
    assert main(["evaluate", str(tmp_path / "nothing"), "--data", str(demo_root)]) == 2
    assert "no such model folder" in capsys.readouterr().err


def _unloadable_model_folder(tmp_path):
    """A folder that passes evaluate's model-folder check and that no loader could read."""
    from dst_train.model.dst_model import CONFIG_FILE, HEADS_FILE

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text("{}")
    (folder / HEADS_FILE).write_bytes(b"")
    return folder


def test_evaluate_names_a_bad_dataset_or_split_before_loading(demo_root, tmp_path, capsys):
    from dst_train.cli import main

    folder = _unloadable_model_folder(tmp_path)  # nothing in it is loaded before the data
    cases = [
        (["--data", str(tmp_path / "nodata")], "not a dataset root"),
        (["--data", str(demo_root), "--split", "nosuch"], "no prepared file for split 'nosuch'"),
    ]
    for extra, message in cases:
        assert main(["evaluate", str(folder), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err
        assert not (tmp_path / "eval").exists()  # nothing written for a run that cannot start


@pytest.mark.parametrize(
    "name", ["stream_batch", "max_context", "max_new_tokens", "max_clips", "baseline_clips"]
)
def test_evaluate_from_python_names_a_count_below_one_before_loading(demo_root, tmp_path, name):
    # the CLI's argparse checks these; a Python caller gets the same check, not a failure (or an
    # empty report) after minutes of model loading and streaming
    from dst_train.eval.evaluate import evaluate

    folder = _unloadable_model_folder(tmp_path)  # nothing in it is loaded before the counts
    with pytest.raises(ValueError, match=rf"^{name} must be >= 1, got 0$"):
        evaluate(folder, demo_root, out=tmp_path / "eval", **{name: 0})
    assert not (tmp_path / "eval").exists()


def test_evaluate_from_python_names_an_unknown_dtype_before_loading(demo_root, tmp_path):
    from dst_train.eval.evaluate import evaluate

    folder = _unloadable_model_folder(tmp_path)
    with pytest.raises(ValueError, match=r"^dtype 'fp8': expected one of \['bf16', 'fp16', "):
        evaluate(folder, demo_root, out=tmp_path / "eval", dtype="fp8")
    assert not (tmp_path / "eval").exists()


def test_evaluate_in_bf16_agrees_with_fp32(demo_root, model_folder, tmp_path):
    from dst_train.eval.evaluate import evaluate

    reports, traces = {}, {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        kw = dict(out=out, max_clips=1, max_new_tokens=2, stream_batch=1, device="cpu")
        kw["embedding_model"] = "minilm"
        reports[dtype] = evaluate(model_folder, demo_root, dtype=dtype, **kw)
        [trace] = (out / "traces").glob("*.jsonl")
        traces[dtype] = [json.loads(x) for x in trace.read_text().splitlines()]
    assert (reports["bf16"]["dtype"], reports["bf16"]["device"]) == ("bf16", "cpu")
    assert len(traces["bf16"]) == len(traces["fp32"]) > 0
    # the first frame only: later frames follow each run's own (rounding-dependent) decisions
    a, b = traces["fp32"][0], traces["bf16"][0]
    for key in ("speak_prob", "update_prob"):
        assert b[key] == pytest.approx(a[key], abs=0.03)
    assert (a["speak_prob"], a["update_prob"]) != (b["speak_prob"], b["update_prob"])  # bf16 ran


def test_evaluate_rejects_a_device_it_cannot_use(tmp_path, capsys):
    from dst_train.cli import main

    args = ["evaluate", str(tmp_path), "--data", str(tmp_path), "--device"]
    assert main([*args, "tpu:x"]) == 2
    assert "error: --device tpu:x" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "cuda"]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err


def _same_trace(a: str, b: str) -> None:
    rows_a, rows_b = ([json.loads(x) for x in t.splitlines()] for t in (a, b))
    assert len(rows_a) == len(rows_b)
    for x, y in zip(rows_a, rows_b, strict=True):
        for key in ("speak_prob", "update_prob"):
            assert x.pop(key) == pytest.approx(y.pop(key), abs=1e-5)
        assert x == y


def test_evaluate_resume_streams_only_the_clips_without_a_trace(
    demo_root, model_folder, tmp_path, monkeypatch, capsys
):
    from dst_train.eval import evaluate as ev
    from dst_train.infer.stream import StreamingAssistant

    out = tmp_path / "eval"
    kw = dict(out=out, split="train", max_clips=3, max_new_tokens=2, stream_batch=2, device="cpu")
    kw["embedding_model"] = "minilm"
    first = ev.evaluate(model_folder, demo_root, **kw)
    assert "metrics_on_baseline_clips" not in first  # no baseline, nothing to compare with
    traces = sorted((out / "traces").glob("*.jsonl"))
    assert len(traces) == first["clips"] >= 2
    # no baseline here: the timeline plot is drawn from the model's own first clip
    plots = json.loads((out / "report.json").read_text())["plots"]
    assert plots == [str(out / "timeline.png"), str(out / "threshold_curves.png")]
    kept = {p.name: p.read_text() for p in traces}
    traces[1].unlink()  # the run stopped before this clip finished ...
    traces[1].with_suffix(".jsonl.tmp").write_text('{"frame": 0, "ti')  # ... mid-write
    streamed, real = [], StreamingAssistant.run_many

    def counting(self, jobs, *args, **kwargs):
        streamed.extend(f"{j.labels.clip.video_uid}_{j.labels.clip.clip_idx}.jsonl" for j in jobs)
        return real(self, jobs, *args, **kwargs)

    monkeypatch.setattr(StreamingAssistant, "run_many", counting)
    second = ev.evaluate(model_folder, demo_root, resume=True, **kw)
    assert streamed == [traces[1].name]
    assert second["metrics"] == first["metrics"]
    again = {p.name: p.read_text() for p in sorted((out / "traces").glob("*.jsonl"))}
    assert again.keys() == kept.keys()
    for name, text in again.items():  # the re-streamed clip ran alone, not in a batch of 2:
        _same_trace(text, kept[name])  # equal decisions, probabilities to fp32 round-off
    from dst_train.cli import main

    args = [str(model_folder), "--data", str(demo_root), "--out", str(out), "--split", "train"]
    args += ["--max-clips", "3", "--device", "cpu", "--embedding-model", "minilm"]
    args += ["--max-new-tokens", "3", "--resume"]
    assert main(["evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "max_new_tokens=2, this run has 3" in err
    # a run without --resume starts the folder afresh: the other clips' traces (made with other
    # settings) must not be there for a later --resume to pick up
    assert main(["evaluate", *args[:-1], "--max-clips", "1"]) == 0
    assert [p.name for p in (out / "traces").glob("*.jsonl*")] == [traces[0].name]
    # a context too small for the system prompt: one error line naming the file, exit 2
    small = [*args[:4], str(tmp_path / "small"), *args[5:-1], "--max-context", "50"]
    assert main(["evaluate", *small]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the weights' progress bars
    assert re.fullmatch(
        r"error: \S+/prepared/val\.jsonl:1: the system prompt alone is \d+ tokens, over "
        r"max_seq_len=50; raise data\.max_seq_len \(evaluate: --max-context\)",
        err,
    ), err


def test_a_killed_evaluate_resumes_to_the_same_report(demo_root, model_folder, tmp_path):
    """kill -9 mid-stream (after some clips' traces are written, maybe mid-write), then the same
    command with --resume: the report and predictions equal an uninterrupted run's."""
    import os
    import signal
    import time

    def command(out, *extra):
        args = [sys.executable, "-m", "dst_train.cli", "evaluate", str(model_folder)]
        args += ["--data", str(demo_root), "--out", str(out), "--split", "train"]
        args += ["--max-clips", "4", "--device", "cpu", "--embedding-model", "minilm"]
        return [*args, "--max-new-tokens", "2", "--stream-batch", "1", *extra]

    def run(*args):
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(*command(tmp_path / "whole"))
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        command(out),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while not list((out / "traces").glob("*.jsonl")) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside the next clip
    killed = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before the kill"
    assert len(list((out / "traces").glob("*.jsonl"))) < 4 and not (out / "report.json").exists()
    run(*command(out, "--resume"))
    whole, resumed = (
        json.loads((d / "report.json").read_text()) for d in (tmp_path / "whole", out)
    )
    assert resumed["metrics"] == whole["metrics"]
    assert (out / "predictions.jsonl").read_text() == (
        tmp_path / "whole" / "predictions.jsonl"
    ).read_text()


def test_two_processes_share_the_clips_and_give_one_process_report(
    demo_root, model_folder, tmp_path
):
    """``deepspeed --num_gpus 2 --module dst_train.cli evaluate ...`` (or torchrun; one process
    per GPU on a GPU machine, 2 CPU processes here): each streams its share of the clips and of
    the val frames, rank 0 scores. Report, predictions and traces equal one process's (each clip
    streamed alone: --stream-batch 1; the probabilities to fp32 round-off)."""
    import shutil

    from dst_train.engine.trainer import free_port

    root = tmp_path / "demo"  # val (the thresholds' split) as 4 clips, not 1: two shares
    shutil.copytree(demo_root, root)
    shutil.copy(root / "prepared/train.jsonl", root / "prepared/val.jsonl")

    def run(out, launcher, *extra, clips=4):
        args = [*launcher, "dst_train.cli", "evaluate", str(model_folder)]
        args += ["--data", str(root), "--out", str(out), "--split", "train"]
        args += ["--max-clips", str(clips), "--embedding-model", "minilm", "--max-new-tokens", "2"]
        args += ["--stream-batch", "1", *extra]
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout, json.loads((out / "report.json").read_text())

    alone = [sys.executable, "-m"]
    baseline = ["--baseline", "--baseline-clips", "3"]
    one_out, one = run(tmp_path / "one", alone, *baseline)
    two_processes = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    launcher = [*two_processes, "--master_port", str(free_port()), "--module"]
    two_out, two = run(tmp_path / "two", launcher, *baseline)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["clips_per_process"] == [4] and two["clips_per_process"] == [2, 2]
    assert one["baseline_clips_per_process"] == [3] and two["baseline_clips_per_process"] == [2, 1]
    for key in ("metrics", "baseline_metrics", "metrics_on_baseline_clips", "model_thresholds",
                "baseline_thresholds", "model_threshold_curves"):  # fmt: skip
        assert two[key] == one[key], key
    assert two_out.count("| speak_f1 |") == 1  # rank 0 prints the table, once
    for name in ("predictions.jsonl", "baseline_predictions.jsonl"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    traces = {d: {p.name: p.read_text() for p in (tmp_path / d / "traces").glob("*.jsonl")}
              for d in ("one", "two")}  # fmt: skip
    assert len(traces["two"]) == 4 and traces["two"].keys() == traces["one"].keys()
    for name, text in traces["two"].items():  # each process runs on fewer threads (the
        _same_trace(text, traces["one"][name])  # launcher's OMP_NUM_THREADS): round-off apart
    # --resume under 2 processes of a run cut short (here: one that streamed 2 of the 4 clips):
    # the clips without a trace are shared out, and the report is the same (no baseline row
    # here: it is always streamed afresh, and an untrained model's clips are the slowest)
    run(tmp_path / "resumed", alone, clips=2)
    launcher = [*two_processes, "--master_port", str(free_port()), "--module"]
    _, resumed = run(tmp_path / "resumed", launcher, "--resume")
    assert resumed["clips_per_process"] == [1, 1] and resumed["metrics"] == one["metrics"]
