"""``dst-train autotune`` end to end on CPU (one process, the real DeepSpeed engine)."""

import json
import subprocess
import sys

import yaml

from tests.engine.helpers import REPO


def _autotune(demo_root, tiny_model_dir, tmp_path, *args):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dst_train.cli",
            "autotune",
            "--config",
            str(REPO / "launch/configs/demo.yaml"),
            f"data.root={demo_root}",
            f"model.arch={tiny_model_dir}",
            f"output_dir={tmp_path / 'run'}",
            "train.micro_batch_size=2",
            "train.global_batch_size=8",
            "--out",
            str(tmp_path / "at"),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_autotune_writes_a_tuned_config_that_keeps_the_global_batch(
    demo_root, tiny_model_dir, tmp_path
):
    proc = _autotune(
        demo_root, tiny_model_dir, tmp_path, "--target-gb", "64", "--no-cache", "--max-micro", "8"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "largest micro-batch that fits: 8" in proc.stdout  # 64 GB: everything up to the cap
    tuned = yaml.safe_load((tmp_path / "at/tuned.yaml").read_text())["train"]
    assert tuned["micro_batch_size"] == 8 and tuned["grad_accum"] == 1
    assert tuned["global_batch_size"] == 8
    ds = json.loads((tmp_path / "at/ds_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 1
    report = (tmp_path / "at/autotune.md").read_text()
    assert "| 1 |" in report and "| 2 |" in report and "| 8 |" in report
    measured = json.loads((tmp_path / "at/autotune.json").read_text())
    assert measured["limit_bytes"] == int(0.9 * 64 * 2**30)  # --fraction (default) × target
    assert measured["peak_bytes"] <= measured["limit_bytes"]


def test_the_fraction_decides_the_answer(demo_root, tiny_model_dir, tmp_path):
    # the same 64 GB card that fits 8 above: a fraction so small that not even 1 fits
    proc = _autotune(
        demo_root,
        tiny_model_dir,
        tmp_path,
        "--target-gb",
        "64",
        "--fraction",
        "0.001",
        "--no-cache",
        "--max-micro",
        "8",
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "micro-batch 1 does not fit" in proc.stderr
    measured = json.loads((tmp_path / "at/autotune.json").read_text())
    assert measured["limit_bytes"] == int(0.001 * 64 * 2**30)


def test_autotune_refuses_clearly_when_nothing_fits(demo_root, tiny_model_dir, tmp_path):
    proc = _autotune(demo_root, tiny_model_dir, tmp_path, "--target-gb", "0.01", "--no-cache")
    assert proc.returncode == 3
    assert "micro-batch 1 does not fit" in proc.stderr
    assert "zero3+offload" in proc.stderr and "gradient_checkpointing" in proc.stderr


def test_a_second_run_reads_the_cache_and_no_cache_measures_again(
    demo_root, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the cache: ~/.cache/dst-train/autotune
    args = ("--target-gb", "64", "--max-micro", "2")

    def report(*extra):
        proc = _autotune(demo_root, tiny_model_dir, tmp_path, *args, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / "at/autotune.json").read_text())

    first = report()
    assert "from_cache" not in first and len(first["probes"]) >= 2
    cached = list((tmp_path / "home/.cache/dst-train/autotune").glob("*.json"))
    assert len(cached) == 1
    second = report()
    assert second["from_cache"] == str(cached[0])
    assert second["probes"] == first["probes"] and second["micro_batch"] == first["micro_batch"]
    third = report("--no-cache")
    assert "from_cache" not in third and third["probes"] != first["probes"]  # measured again
    assert json.loads(cached[0].read_text())["probes"] == first["probes"]  # and not cached
    cached[0].write_text('{"probes": [')  # a cache entry cut short (a crash mid-write)
    again = report()
    assert "from_cache" not in again and again["micro_batch"] == first["micro_batch"]
    assert json.loads(cached[0].read_text())["probes"] == again["probes"]  # whole again
    other = report("--fraction", "0.8")  # another key: measured, cached beside the first
    assert "from_cache" not in other
    assert len(list(cached[0].parent.glob("*.json"))) == 2


def test_global_batch_flag_sets_the_accumulation(demo_root, tiny_model_dir, tmp_path):
    proc = _autotune(demo_root, tiny_model_dir, tmp_path, "--target-gb", "64", "--no-cache",
                     "--max-micro", "4", "--global-batch", "24")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = yaml.safe_load((tmp_path / "at/tuned.yaml").read_text())["train"]
    # the config's 8 replaced by the flag's 24: micro-batch 4 on 1 process accumulates 6
    got = (tuned["micro_batch_size"], tuned["global_batch_size"], tuned["grad_accum"])
    assert got == (4, 24, 6)
