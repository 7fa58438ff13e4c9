"""A signal stops a run with nothing lost, and the same command resumes it exactly.

SIGTERM (a scheduler's preemption or time limit, ``kill``, a launcher passing on Ctrl-C), SIGINT
and SIGUSR1 (SLURM's early warning) make every rank stop within two micro-steps, save the
state after the last completed optimizer step and exit with code 75. Each scenario is a short
real run (tiny SmolVLM with LoRA dropout, DeepSpeed ZeRO-2, gloo, three micro-batches a step;
tests/engine/scenario_stop.py) stopped by a signal at a chosen place and run again, compared
with the uninterrupted run.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dst_train.engine.stop_request import EXIT_CODE, StopRequest, host_group
from tests.engine.helpers import run_scenario

SCRIPT = str(Path(__file__).parent / "scenario_stop.py")


def _scenarios(demo_root, tiny_model_dir, out, specs, nproc=2):
    proc, found, _ = run_scenario(SCRIPT, demo_root, tiny_model_dir, out, specs, nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert len(found) == nproc * (1 + len(specs)), proc.stdout[-3000:]
    return proc, {(r["spec"], r["rank"]): r for r in found}


def _weights(out: Path, spec: str) -> dict:
    return torch.load(out / spec.replace(":", "_") / "final.pt")


def test_a_signal_mid_step_on_one_rank_stops_all_and_the_resume_is_exact(
    demo_root, tiny_model_dir, tmp_path
):
    # A signal is acted on at the second stop check after it (the ranks' all-reduce of the
    # flags is read one check later), and the checks come before every micro-step (3 a step)
    # and val batch. "3:0:1": only rank 1 gets SIGTERM, in step 3's first micro-batch: both ranks
    # stop before the third, drop the half-accumulated step and save step 2 (with the data
    # position and RNG of step 3's start). "3:1:all": every rank, in step 3's second
    # micro-batch: step 3 ends, is logged and saved, and the run stops before step 4. "2:1:all":
    # before the val loss due after step 2 (eval_every 2): the val pass is cut short, step 2
    # saved. "5:1:all": trained to the end, the final val loss cut short, step 5 saved; the run
    # again has nothing to do
    specs = ["3:0:1", "3:1:all", "2:1:all", "5:1:all"]
    proc, found = _scenarios(demo_root, tiny_model_dir, tmp_path, specs)
    ref = found[("reference", 0)]
    assert ref["first"] == {"step": 5}  # not stopped
    assert ref["steps"] == [1, 2, 3, 4, 5] and ref["val_steps"] == [2, 4, 5]
    for said in (
        "stopped by a signal on another rank during step 3: saved ",
        "stopped by SIGTERM during step 4: saved ",
        "stopped by SIGTERM during the val loss after step 2: saved ",
        "stopped by SIGTERM during the final val loss after step 5: saved ",
    ):
        assert said in proc.stdout
    cases = {  # spec: (the step saved, the val losses logged by the end)
        "3:0:1": (2, [2, 4, 5]),
        "3:1:all": (3, [2, 4, 5]),
        "2:1:all": (2, [4, 5]),  # a val pass cut short is not run again
        "5:1:all": (5, [2, 4]),
    }
    reference = _weights(tmp_path, "reference")
    for spec, (saved, val_steps) in cases.items():
        for rank in (0, 1):
            r = found[(spec, rank)]
            why = "a signal on another rank" if (spec, rank) == ("3:0:1", 0) else "SIGTERM"
            assert r["first"] == {"step": saved, "stopped": why}, (spec, rank)
            assert r["resumed_step"] == 5 and r["handler_restored"], (spec, rank)
            # each step logged once (an abandoned step was never logged), the same losses
            assert r["steps"] == ref["steps"] and r["losses"] == ref["losses"], (spec, rank)
            assert r["val_steps"] == val_steps, (spec, rank)
        got = _weights(tmp_path, spec)
        assert got.keys() == reference.keys() and len(reference) > 4
        for k in reference:
            assert torch.equal(got[k], reference[k]), (spec, k)  # bit-exact


def test_repeated_signals_are_one_request_and_a_second_ctrl_c_is_now():
    stop = StopRequest()
    before = signal.getsignal(signal.SIGTERM)
    with stop:
        assert stop.agreed() is None
        signal.raise_signal(signal.SIGUSR1)  # SLURM's warning, then the scheduler's SIGTERM
        signal.raise_signal(signal.SIGTERM)
        assert stop.agreed() == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    with StopRequest() as ctrl_c:
        signal.raise_signal(signal.SIGINT)
        assert ctrl_c.agreed() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_a_stopped_run_exits_with_the_code_that_means_resume(monkeypatch, tmp_path):
    from dst_train import cli
    from dst_train.engine import trainer

    monkeypatch.setattr(cli, "_run_config", lambda args: object())
    monkeypatch.setattr(trainer, "die_with_launcher", lambda: None)
    monkeypatch.setattr(trainer, "fit", lambda cfg: {"step": 2, "stopped": "SIGTERM"})
    assert cli.main(["train", "--config", str(tmp_path / "x.yaml")]) == EXIT_CODE == 75
    monkeypatch.setattr(trainer, "fit", lambda cfg: {"step": 5, "val_loss": 1.0})
    assert cli.main(["train", "--config", str(tmp_path / "x.yaml")]) == 0


def _agree_from_a_gpu_like_device(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    # "meta" stands in for the GPU: a flag made on the run's device could not travel over
    # gloo, and on a GPU its read would wait for the whole previous micro-step
    stop = StopRequest(world=2, group=host_group(torch.device("meta"), 2))
    said = [stop.agreed()]  # asks the ranks
    if rank == 1:
        stop.signal = "SIGTERM"
    said.append(stop.agreed())  # reads the first answer (no signal yet), asks again
    said.append(stop.agreed())  # reads the second
    stop.settle()
    Path(root, f"rank{rank}.json").write_text(json.dumps(said))
    torch.distributed.destroy_process_group()


def _two_ranks(fn, root: Path, limit_s: float = 60) -> None:
    """``fn(rank, port, root)`` in 2 gloo processes; past ``limit_s`` they are killed (a hang
    fails the test that reads what they wrote, instead of holding the suite)."""
    from dst_train.engine.trainer import free_port

    ctx = torch.multiprocessing.spawn(fn, args=(int(free_port()), str(root)), nprocs=2, join=False)
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=1) and time.monotonic() < deadline:
        pass
    for p in ctx.processes:
        p.kill()


def test_the_ranks_of_a_gpu_run_agree_on_a_stop_over_the_cpu(tmp_path):
    _two_ranks(_agree_from_a_gpu_like_device, tmp_path)
    said = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert said == [[None, None, "a signal on another rank"], [None, None, "SIGTERM"]]


def _fail_inside_the_loop(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        with StopRequest(world=2, group=host_group(torch.device("meta"), 2)) as stop:
            if rank == 0:
                stop.agreed()  # asks the ranks: rank 1 fails before it ever joins
            raise RuntimeError(f"rank {rank} failed")
    except RuntimeError as e:
        Path(root, f"rank{rank}.txt").write_text(str(e))
    torch.distributed.destroy_process_group()


def test_a_rank_that_fails_mid_loop_leaves_without_waiting_for_the_others(tmp_path):
    """An error inside the loop leaves the stop check at once, with the flags' all-reduce still
    in flight: waiting for it there would wait for a rank that failed before it joined (a hang,
    or the peer's closed connection in place of the real error)."""
    _two_ranks(_fail_inside_the_loop, tmp_path)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert said == ["rank 0 failed", "rank 1 failed"]
