"""Real 2-process DeepSpeed runs on CPU (gloo): every ZeRO config trains, the stages agree,
and the run directory holds what it should (kills and resumes: test_resume.py)."""

import pytest
import torch

from tests.engine.helpers import (
    base_overrides,
    final_state,
    metrics,
    run_training,
)


@pytest.fixture(scope="module")
def runs(demo_root, tiny_model_dir, tmp_path_factory):
    """One run per ZeRO config on the same data and seed (module-scoped: reused by tests)."""
    out = {}
    for name in ("zero2", "zero3", "zero3_offload"):
        d = tmp_path_factory.mktemp(name)
        run_training(
            [
                *base_overrides(demo_root, tiny_model_dir, d),
                "train.save_every=3",
                f"train.ds_config=ds_configs/{name}.json",
            ]
        )
        out[name] = d
    return out


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_each_zero_config_trains_and_the_loss_falls(runs, name):
    rows = metrics(runs[name])
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[-1]["loss"] < train[0]["loss"]
    for key in (
        "speak_loss",
        "update_loss",
        "response_loss",
        "dst_loss",
        "lr",
        "tokens_per_s",
        "samples_per_s",
        "peak_mem_gib",
        "skipped_steps",
    ):
        assert key in train[-1]
    assert all(0.05 < r["peak_mem_gib"] < 64 for r in train)  # the rank's peak RSS, in GiB
    assert len([r for r in rows if r["kind"] == "eval"]) == 2
    d = runs[name]
    for f in ("config.yaml", "ds_config.json", "loss_curve.png", "metrics.jsonl"):
        assert (d / f).is_file(), f
    assert (d / "checkpoints" / "latest").read_text() == "step_00000006"


def test_zero2_and_zero3_reach_the_same_weights(runs):
    a, b = final_state(runs["zero2"]), final_state(runs["zero3"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    moved = final_state(runs["zero3_offload"])
    for k in a:
        torch.testing.assert_close(a[k], moved[k], rtol=1e-4, atol=1e-5, msg=k)


def test_keep_last_k(runs):
    tags = sorted(p.name for p in (runs["zero2"] / "checkpoints").glob("step_*"))
    assert tags == ["step_00000003", "step_00000006"]  # keep_last=2 in the demo config
