"""The OOM safety net (``train.oom_retry``): a replayed step equals a clean step at the smaller
micro-batch, wherever the out-of-memory error hit; what cannot be replayed stops the run fast.

Each scenario is a short real run (tiny SmolVLM, DeepSpeed ZeRO-2, gloo) with one simulated CUDA
OOM (tests/engine/scenario_oom.py). The reference for an OOM anywhere in step 2 is the run whose
OOM hit step 2's first forward: nothing had been accumulated there, so its replay is a clean step
at micro-batch 1 (steps 2 and 3 at micro-batch 1, step 1 at 2, like every scenario here).
"""

from pathlib import Path

import torch

from dst_train.engine.trainer import OOM_SCRATCH
from tests.engine.helpers import run_scenario

SCRIPT = str(Path(__file__).parent / "scenario_oom.py")
REFERENCE = "2:0:forward:all"
HALVED = "out of memory: micro-batch 2 -> 1, accumulation 4 (the same samples per step)"


def _run(demo_root, tiny_model_dir, out, specs, nproc=1, expect_rc=0):
    proc, found, seconds = run_scenario(SCRIPT, demo_root, tiny_model_dir, out, specs, nproc)
    assert (proc.returncode == 0) == (expect_rc == 0), proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, sorted(found, key=lambda r: (r["spec"], r["rank"])), seconds


def _max_weight_diff(out, spec) -> float:
    ref = torch.load(out / REFERENCE.replace(":", "_") / "final.pt")
    got = torch.load(out / spec.replace(":", "_") / "final.pt")
    assert got.keys() == ref.keys() and len(ref) > 10
    return max((got[k] - ref[k]).abs().max().item() for k in ref)


def test_an_oom_later_in_a_window_or_in_backward_replays_as_a_clean_step(
    demo_root, tiny_model_dir, tmp_path
):
    # the 2nd micro-batch's forward (the 1st one's gradients are already inside ZeRO-2's
    # partitioned buffers) and mid-backward (the later layers' gradients reached DeepSpeed's
    # hooks, the earlier ones never will), and while assembling step 2's first micro-batch (on a
    # GPU the frames are allocated there; it came after step 1's optimizer step, whose phase
    # said "cannot be replayed")
    specs = [REFERENCE, "2:1:forward:all", "2:1:backward:all", "2:0:collate:all"]
    proc, found, _ = _run(demo_root, tiny_model_dir, tmp_path, specs)
    assert proc.stdout.count(HALVED + "; replaying step 2") == 4
    for r in found:
        assert r["oom_calls"] == 1 and r["engines_built"] == 2
        assert r["engines_alive"] == 1  # the replaced engine was freed (its optimizer state too)
        assert r["micro_batches"] == [2, 1, 1] and r["global_steps"] == 3
        assert (r["micro_batch_size"], r["accumulation"], r["train_batch_size"]) == (1, 4, 4)
        # the scratch checkpoint the new engine was loaded from is gone
        assert not (tmp_path / r["spec"].replace(":", "_") / OOM_SCRATCH).exists()
    for spec in specs[1:]:
        # measured 0.0 (bit-identical); DeepSpeed's zero_grad + a replay gave 3.6e-2
        assert _max_weight_diff(tmp_path, spec) <= 1e-6, spec


def test_an_oom_on_one_rank_in_forward_replays_on_every_rank(demo_root, tiny_model_dir, tmp_path):
    # only rank 1 runs out, in the 2nd micro-batch: without the agreement rank 0 would go on
    # into backward's collectives alone
    proc, found, _ = _run(demo_root, tiny_model_dir, tmp_path, [REFERENCE, "2:1:forward:1"], 2)
    assert proc.stdout.count(HALVED) == 2  # once per run, said by rank 0
    one_rank = [r for r in found if r["spec"] == "2:1:forward:1"]
    assert [r["oom_calls"] for r in one_rank] == [0, 1]
    for r in found:
        assert (r["micro_batch_size"], r["accumulation"], r["train_batch_size"]) == (1, 4, 8)
        assert r["global_steps"] == 3 and r["micro_batches"] == [2, 1, 1]
    assert _max_weight_diff(tmp_path, "2:1:forward:1") <= 1e-6


def test_an_oom_that_cannot_be_replayed_stops_the_run_at_once(demo_root, tiny_model_dir, tmp_path):
    # one rank of two in backward: rank 0 may be inside a gradient collective rank 1 will never
    # join; rank 1 says so and exits, and the launcher stops rank 0 (no hang: a run takes ~20 s)
    proc, found, seconds = _run(
        demo_root, tiny_model_dir, tmp_path / "two", ["2:1:backward:1"], 2, expect_rc=1
    )
    assert found == [] and seconds < 120
    assert (
        "training stopped: CUDA out of memory (simulated, backward) (in the backward of step 2, "
        "rank 1): this cannot be replayed in place"
    ) in proc.stderr
    assert "Run the same command to resume from the last checkpoint" in proc.stderr
    # the optimizer step had started: parameters may be half updated
    proc, found, _ = _run(demo_root, tiny_model_dir, tmp_path / "one", ["2:1:step:all"], 1, 1)
    assert found == [] and "(the optimizer step had started)" in proc.stderr
