import json
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
    assert found["late_partial_left"] is True  # the engine's save had run before the crash
    assert found["latest_file_after_late_crash"] == "step_00000002"
    assert found["latest_after_good_save"] == "step_00000004"
    assert found["late_partial_removed"] is True
    assert not any(
        p.name == "step_00000004" and not (p / "COMPLETE").exists()
        for p in (tmp_path / "checkpoints").glob("step_*")
    )
    for key, diff in found["max_abs_diff"].items():
        assert diff < 1e-5, (key, diff)
    assert found["plain_transformers_params"] > 100_000
    assert {"peak_ram_gib", "seconds"} <= set(found["convert_report_keys"])


def test_convert_names_a_folder_without_a_complete_checkpoint(tmp_path, capsys):
    from dst_train.cli import main

    step = tmp_path / "checkpoints" / "step_5"  # a save that crashed before COMPLETE was written
    step.mkdir(parents=True)
    assert main(["convert", str(tmp_path), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: no complete checkpoint"), err
    assert not (tmp_path / "hf").exists()


def test_a_convert_killed_midway_leaves_the_old_folder_and_a_rerun_completes(
    demo_root, tiny_model_dir, tmp_path, monkeypatch
):
    import pytest

    from dst_train.engine import convert as conv
    from tests.engine.helpers import base_overrides, run_training

    run = tmp_path / "run"
    run_training(
        [*base_overrides(demo_root, tiny_model_dir, run), "train.max_steps=2"],
        launcher="python",
        nproc=1,
    )
    out = tmp_path / "exports" / "hf"  # a folder whose parent does not exist yet
    conv.convert(run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-convert (simulated)")

    real = conv.swap_in
    monkeypatch.setattr(conv, "swap_in", killed)  # everything written, not yet swapped in
    with pytest.raises(KeyboardInterrupt):
        conv.convert(run, out, dtype="bf16")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert (out.parent / "hf.partial").is_dir()  # the half that a kill leaves, beside, not in OUT
    monkeypatch.setattr(conv, "swap_in", real)
    report = conv.convert(run, out, dtype="bf16")  # the same command again
    assert report["out"] == str(out) and not (out.parent / "hf.partial").exists()
    assert 0.05 < report["peak_ram_gib"] < 1024  # this process's peak, in GiB (ru_maxrss: KiB)
    assert not (out.parent / "hf.old").exists()
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]  # bf16 now

    # weights the model does not have (another model's checkpoint, a renamed layer) are refused,
    # not left out of a model that loads
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32
    import torch

    consolidate = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint
    monkeypatch.setattr(
        zero_to_fp32,
        "get_fp32_state_dict_from_zero_checkpoint",
        lambda *a, **kw: {**consolidate(*a, **kw), "speak_head.extra": torch.zeros(2)},
    )
    with pytest.raises(ValueError, match=r"does not match the model .*unexpected \['speak_head"):
        conv.convert(run, tmp_path / "other")
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.partial").exists()
    # and so is a checkpoint that lacks weights the model has: they would keep their random init
    monkeypatch.setattr(
        zero_to_fp32,
        "get_fp32_state_dict_from_zero_checkpoint",
        lambda *a, **kw: {
            k: v for k, v in consolidate(*a, **kw).items() if not k.startswith("update_head")
        },
    )
    with pytest.raises(ValueError, match=r"does not match the model \(missing \['update_head"):
        conv.convert(run, tmp_path / "other")
    assert not (tmp_path / "other").exists()
