"""Resume is exact: a run resumed from any checkpoint, or killed (SIGKILL, whole launcher group,
real ``deepspeed`` launcher) at random moments and started again, ends with bit-identical
weights and one metrics row per step, as an uninterrupted run of the same command.

LoRA dropout is on (0.3) so that every random draw matters, and one epoch holds several
batches per rank, so the data position inside an epoch matters too."""

import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from dst_train.engine import checkpoint
from dst_train.engine.metrics import drop_rows_after
from tests.engine.helpers import (
    REPO,
    base_overrides,
    final_state,
    metrics,
    run_training,
    train_command,
)


def overrides(demo_root, tiny_model_dir, out, *extra):
    return [
        *base_overrides(demo_root, tiny_model_dir, out),
        "model.lora=true",
        "model.lora_r=4",
        "model.lora_dropout=0.3",
        "train.micro_batch_size=1",
        "train.save_every=1",
        "train.keep_last=0",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(demo_root, tiny_model_dir, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run_training(overrides(demo_root, tiny_model_dir, out))
    return out


def assert_same_run(out, ref):
    rows = [r for r in metrics(out) if r["kind"] == "train"]
    want = [r for r in metrics(ref) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # each step logged once
    assert [r["loss"] for r in rows] == [r["loss"] for r in want]
    a, b = final_state(out), final_state(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact


def test_an_epoch_holds_several_batches(reference):
    rows = [r for r in metrics(reference) if r["kind"] == "train"]
    # 4 train clips, 2 ranks x 1: two steps an epoch, so step 3 starts mid-epoch 1
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2, 2]


def test_resuming_from_a_checkpoint_folder_is_bit_exact(
    reference, demo_root, tiny_model_dir, tmp_path
):
    # a fresh output folder resumed from the uninterrupted run's step-3 checkpoint (half-way
    # through epoch 1): steps 4..6 must be those of the uninterrupted run (dropout's RNG, data
    # position, optimizer)
    out = tmp_path / "resumed"
    folder = reference / "checkpoints" / checkpoint.tag_of(3)
    run_training(overrides(demo_root, tiny_model_dir, out, f"train.resume={folder}"))
    rows = [r for r in metrics(out) if r["kind"] == "train"]
    want = {r["step"]: r["loss"] for r in metrics(reference) if r["kind"] == "train"}
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert [r["loss"] for r in rows] == [want[s] for s in (4, 5, 6)]
    a, b = final_state(out), final_state(reference)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (as a user's kill -9 / a scheduler would), then wait
    until no process of the run is left (workers die with their launcher)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        alive = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout
        if not alive.strip():
            return
        time.sleep(0.2)
    raise AssertionError("processes of the killed run are still alive")


def test_random_kills_through_the_deepspeed_launcher_resume_exactly(
    reference, demo_root, tiny_model_dir, tmp_path
):
    out = tmp_path / "killed"
    args = overrides(demo_root, tiny_model_dir, out)
    rng = random.Random(int(os.environ.get("KILL_SEED", "0")))
    kills = 0
    for _attempt in range(4):
        proc = subprocess.Popen(
            train_command(args),  # the deepspeed launcher, 2 processes
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # startup takes ~8 s, a step well under a second: kill somewhere in the steps and saves
        time.sleep(rng.uniform(8.0, 16.0))
        if proc.poll() is not None:
            break
        _kill_tree(proc)
        kills += 1
    run_training(args)  # the same command, to the end
    assert kills >= 1, "no kill landed: the run finished before the first one"
    assert_same_run(out, reference)


def test_rerunning_a_finished_run_changes_nothing(reference, demo_root, tiny_model_dir):
    ckpts = reference / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")}
    log = (reference / "metrics.jsonl").read_text()
    proc = run_training(overrides(demo_root, tiny_model_dir, reference))
    assert "nothing to do" in proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")} == before  # nothing re-saved
    assert (reference / "metrics.jsonl").read_text() == log


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    for step in (2, 4):
        (tmp_path / checkpoint.tag_of(step)).mkdir()
        (tmp_path / checkpoint.tag_of(step) / checkpoint.COMPLETE).write_text("")
    (tmp_path / checkpoint.tag_of(6)).mkdir()  # a save killed before COMPLETE
    (tmp_path / "latest").write_text(checkpoint.tag_of(6))
    assert checkpoint.latest_tag(tmp_path) == checkpoint.tag_of(4)
    (tmp_path / "latest").write_text("")  # torn
    assert checkpoint.latest_tag(tmp_path) == checkpoint.tag_of(4)
    (tmp_path / "latest").unlink()
    assert checkpoint.latest_tag(tmp_path) == checkpoint.tag_of(4)
    (tmp_path / "latest").write_text(checkpoint.tag_of(2))
    assert checkpoint.latest_tag(tmp_path) == checkpoint.tag_of(2)  # latest wins when complete


def test_rows_logged_after_the_last_checkpoint_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [f'{{"kind": "train", "step": {s}}}' for s in range(1, 6)]
    path.write_text("\n".join(rows) + '\n{"kind": "tra')  # the kill tore the last line
    drop_rows_after(path, 3)
    assert path.read_text().splitlines() == rows[:3]


def test_workers_die_with_a_killed_torchrun(demo_root, tiny_model_dir, tmp_path):
    # torchrun starts its workers in sessions of their own: a kill of its process group does not
    # reach them, so they must follow their launcher themselves (else they keep writing here)
    out = tmp_path / "orphans"
    args = overrides(demo_root, tiny_model_dir, out, "train.max_steps=1000")
    proc = subprocess.Popen(
        train_command(args, launcher="torchrun"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def workers():
        found = subprocess.run(["pgrep", "-f", f"output_dir={out}"], capture_output=True).stdout
        return [int(p) for p in found.split() if int(p) != proc.pid]

    deadline = time.time() + 120
    while time.time() < deadline and not (out / "config.yaml").is_file():  # training has begun
        time.sleep(0.2)
    assert len(workers()) == 2, "the workers never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and workers():
        time.sleep(0.2)
    left = workers()
    for pid in left:  # never leave them running, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, "workers outlived their killed launcher"


def test_sigterm_to_the_whole_run_with_loader_workers_saves_and_resumes_exactly(
    reference, demo_root, tiny_model_dir, tmp_path
):
    # what SLURM's scancel or preemption does: SIGTERM to every process, the loader workers
    # too. A worker killed by it made its rank fail on the next batch, before saving; they now
    # leave the signal to their rank, and are shut down when it stops
    out = tmp_path / "terminated"
    args = overrides(demo_root, tiny_model_dir, out, "data.num_workers=2", "train.save_every=0")
    log = tmp_path / "run.log"
    proc = subprocess.Popen(
        train_command(args), cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not any(r["kind"] == "train" for r in _complete_rows(out)):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
    start = time.time()
    while subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True).stdout.strip():
        assert time.time() - start < 20, "processes of the stopped run are still alive"
        time.sleep(0.2)
    assert "stopped by SIGTERM during " in log.read_text(), log.read_text()[-3000:]
    assert checkpoint.latest_tag(out / "checkpoints") is not None
    run_training(args)  # the same command, to the end
    assert_same_run(out, reference)


def _complete_rows(out) -> list[dict]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    return [json.loads(x) for x in lines if x.endswith("\n")]
