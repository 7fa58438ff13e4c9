import json
import math
import subprocess
import sys
from pathlib import Path

from tests.engine.helpers import REPO


def _scenario(demo_root, tiny_model_dir, out):
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "scenario_single_rank.py"),
            str(demo_root),
            str(tiny_model_dir),
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_crash_mid_save_keeps_previous_checkpoint_and_convert_matches(
    demo_root, tiny_model_dir, tmp_path
):
    found = _scenario(demo_root, tiny_model_dir, tmp_path)
    assert found["crash"] == "disk full (simulated)"
    assert found["latest_after_crash"] == "step_00000002"  # the pointer never moved
    assert found["partial_left"] is True
    assert found["resumed_state"]["step"] == 2  # the previous checkpoint loads
    assert found["latest_after_good_save"] == "step_00000004"
    assert not any(
        p.name == "step_00000004" and not (p / "COMPLETE").exists()
        for p in (tmp_path / "checkpoints").glob("step_*")
    )
    for key, diff in found["max_abs_diff"].items():
        assert diff < 1e-5, (key, diff)
    assert found["plain_transformers_params"] > 100_000
    assert {"peak_ram_gib", "seconds"} <= set(found["convert_report_keys"])


def test_oom_safety_net_halves_the_micro_batch_and_keeps_the_global_batch(
    demo_root, tiny_model_dir, tmp_path
):
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "scenario_oom.py"),
            str(demo_root),
            str(tiny_model_dir),
            str(tmp_path / "run"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "out of memory: micro-batch 2 -> 1, accumulation 4" in proc.stdout
    r = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert r["oom_calls"] == 1  # once; then every step runs in chunks of one sample
    assert r["micro_batches"] == [1, 1, 1, 1]
    assert (r["micro_batch_size"], r["accumulation"], r["train_batch_size"]) == (1, 4, 4)
    assert r["global_steps"] == 4  # 4 optimizer steps, none lost to the replay
    assert all(math.isfinite(x) for x in r["losses"])


def test_convert_names_a_folder_without_a_complete_checkpoint(tmp_path, capsys):
    from dst_train.cli import main

    step = tmp_path / "checkpoints" / "step_5"  # a save that crashed before COMPLETE was written
    step.mkdir(parents=True)
    assert main(["convert", str(tmp_path), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: no complete checkpoint"), err
    assert not (tmp_path / "hf").exists()
