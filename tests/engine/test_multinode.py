"""Several nodes, proven on one host: 2 "nodes" × 1 process (gloo on 127.0.0.1), each started
by its own DeepSpeed launcher without ssh — by ``launch/train_multinode.sh`` directly, and by
``launch/slurm.sbatch`` under a stand-in for SLURM's ``srun``/``scontrol``. Killed after a
checkpoint and started again, they end bit-identical to 1 node × 2 processes. With
``train.node_local_checkpoints`` each "node" runs in its own folder (its own disk): resume works
from each node's own shards, and ``convert`` names the shards it lacks until they are copied in.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dst_train.engine import checkpoint
from tests.engine.helpers import (
    DEMO_YAML,
    REPO,
    FolderEngine,
    base_overrides,
    final_state,
    free_port,
    metrics,
    run_training,
)

FAKE_SRUN = """#!/usr/bin/env bash
# srun's part in a 2-node allocation, on one host: node i runs in $FAKE_NODES/node$i
while [[ $1 == --* ]]; do shift; done
pids=()
for i in 0 1; do
  (cd "$FAKE_NODES/node$i" && SLURM_NODEID=$i SLURM_PROCID=$i exec "$@") &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf '127.0.0.1\\nlocalhost\\n'
[[ $1 == requeue ]] && echo "$2" >> "$FAKE_NODES/requeued"
exit 0
"""


def overrides(demo_root, tiny_model_dir, out, *extra):
    return [
        *base_overrides(demo_root, tiny_model_dir, out),
        "train.micro_batch_size=1",
        "train.save_every=2",
        "train.keep_last=0",
        *extra,
    ]


@pytest.fixture(scope="module")
def one_node(demo_root, tiny_model_dir, tmp_path_factory):
    """The reference: 1 node × 2 processes, uninterrupted."""
    out = tmp_path_factory.mktemp("one-node")
    run_training(overrides(demo_root, tiny_model_dir, out))
    return out


def _env(**extra) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # the venv's deepspeed launcher
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **extra)


def _kill_when_saved(procs, ckpt_dirs, step=2, timeout=300):
    """Wait until checkpoint ``step`` is complete in every folder, then SIGKILL each process
    group (a node lost); False when a run ended first."""
    folder = checkpoint.tag_of(step)
    deadline = time.time() + timeout
    while not all((d / folder / checkpoint.COMPLETE).is_file() for d in ckpt_dirs):
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            return False
        time.sleep(0.05)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for p in procs:
        _wait_group_gone(p.pid)
    return True


def _wait_group_gone(pgid: int) -> None:
    deadline = time.time() + 30
    while subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).stdout.strip():
        assert time.time() < deadline, "processes of the killed run are still alive"
        time.sleep(0.2)


def _assert_same_run(out, ref):
    rows = [r for r in metrics(out) if r["kind"] == "train"]
    want = [r for r in metrics(ref) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in want]
    a, b = final_state(out), final_state(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_nodes_without_ssh_resume_after_a_kill_and_equal_one_node(
    one_node, demo_root, tiny_model_dir, tmp_path
):
    out = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    args = overrides(demo_root, tiny_model_dir, out)

    def start_nodes():
        port = free_port()
        return [
            subprocess.Popen(
                [str(REPO / "launch/train_multinode.sh"), str(DEMO_YAML), *args],
                cwd=REPO,
                env=_env(
                    HOSTFILE=str(hostfile),
                    NODE_RANK=str(n),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port,
                ),  # fmt: skip
                stdout=open(tmp_path / f"node{n}.log", "a"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for n in (0, 1)
        ]

    assert _kill_when_saved(start_nodes(), [out / "checkpoints"]), "the run ended before a kill"
    assert not (out / "checkpoints" / checkpoint.tag_of(6)).exists()
    for n, p in enumerate(start_nodes()):
        assert p.wait(timeout=600) == 0, (tmp_path / f"node{n}.log").read_text()[-3000:]
    _assert_same_run(out, one_node)


class FakeSlurm:
    """``launch/slurm.sbatch`` run as SLURM would on 2 nodes, on this host: a stand-in ``srun``
    starts node i's task in ``nodes/node<i>``, ``scontrol`` lists the hosts and records requeues
    in ``nodes/requeued``; the job's output goes to ``job.log``."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        fake = tmp_path / "slurm-bin"
        fake.mkdir()
        for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
            (fake / name).write_text(text)
            (fake / name).chmod(0o755)
        self.bin, self.nodes = fake, tmp_path / "nodes"
        self.disks = [self.nodes / f"node{i}" for i in (0, 1)]
        for d in self.disks:
            d.mkdir(parents=True)

    def submit(self, args) -> subprocess.Popen:
        env = _env(FAKE_NODES=str(self.nodes), SLURM_JOB_NODELIST="fake[0-1]", GPUS_PER_NODE="1")
        env.update(SLURM_SUBMIT_DIR=str(REPO), MASTER_PORT=free_port(), SLURM_JOB_ID="4242")
        env["PATH"] = f"{self.bin}:{env['PATH']}"
        return subprocess.Popen(
            ["bash", str(REPO / "launch/slurm.sbatch"), str(DEMO_YAML), *args],
            cwd=REPO, env=env, stdout=open(self.tmp / "job.log", "a"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def log(self) -> str:
        return (self.tmp / "job.log").read_text()


def test_slurm_nodes_with_their_own_disks_resume_and_convert(
    one_node, demo_root, tiny_model_dir, tmp_path
):
    slurm = FakeSlurm(tmp_path)
    disks = slurm.disks
    # the same relative output_dir on each node: two folders, as on two machines' local disks
    args = overrides(demo_root, tiny_model_dir, "run", "train.node_local_checkpoints=true")
    ckpts = [d / "run" / "checkpoints" for d in disks]
    assert _kill_when_saved([slurm.submit(args)], ckpts), "the run ended before a kill"
    assert slurm.submit(args).wait(timeout=600) == 0, slurm.log()[-3000:]
    tag = checkpoint.tag_of(6)
    # each node holds its own rank's shard (and the model states) and the checkpoint's files
    for r, ckpt in enumerate(ckpts):
        names = {p.name for p in (ckpt / tag).iterdir()}
        assert f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in names
        assert f"zero_pp_rank_{1 - r}_mp_rank_00_optim_states.pt" not in names
        assert {"mp_rank_00_model_states.pt", checkpoint.COMPLETE, "trainer.json"} <= names
    from dst_train.cli import main

    assert main(["convert", str(disks[0] / "run"), str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()
    for f in (ckpts[1] / tag).glob("zero_pp_rank_1_*"):  # what the message asks for
        shutil.copy(f, ckpts[0] / tag)
    assert main(["convert", str(disks[0] / "run"), str(tmp_path / "hf")]) == 0
    _assert_same_run(disks[0] / "run", one_node)


def test_slurms_warning_signal_saves_stops_and_requeues_and_the_requeued_job_resumes(
    one_node, demo_root, tiny_model_dir, tmp_path
):
    """``--signal=USR1@300``: SLURM signals every process of the job's steps (the launchers and
    the loader workers too, not the batch shell or srun) ahead of the time limit."""
    slurm = FakeSlurm(tmp_path)
    out = tmp_path / "run"  # one filesystem for both nodes
    args = overrides(demo_root, tiny_model_dir, out, "data.num_workers=2")
    job = slurm.submit(args)
    deadline = time.time() + 300
    while not [r for r in _rows(out) if r["kind"] == "train" and r["step"] >= 2]:
        assert job.poll() is None and time.time() < deadline, slurm.log()[-3000:]
        time.sleep(0.05)
    group = subprocess.run(["pgrep", "-g", str(job.pid)], capture_output=True, text=True)
    signalled = 0
    for pid in map(int, group.stdout.split()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:  # a short-lived helper that has ended
            continue
        if pid != job.pid and b"slurm-bin/srun" not in cmd:  # not the batch shell, not srun
            os.kill(pid, signal.SIGUSR1)
            signalled += 1
    assert signalled >= 10  # per node: the deepspeed runner, its launcher, the rank, 2 workers
    assert job.wait(timeout=120) == 75, slurm.log()[-3000:]
    log = slurm.log()
    # where the stop lands depends on timing: in a step (the one before is saved) or in a val
    # pass (the step just done is saved)
    stop = re.search(
        r"stopped by SIGUSR1 during (step|.*val loss after step) (\d+): saved (\S+) in", log
    )
    assert stop, log[-3000:]
    saved = int(stop.group(2)) - (stop.group(1) == "step")
    assert 2 <= saved <= 6 and stop.group(3) == str(out / "checkpoints" / checkpoint.tag_of(saved))
    assert (out / "checkpoints" / checkpoint.tag_of(saved) / checkpoint.COMPLETE).is_file()
    assert [r["step"] for r in _rows(out) if r["kind"] == "train"] == list(range(1, saved + 1))
    assert "requeueing job 4242" in log and (slurm.nodes / "requeued").read_text() == "4242\n"
    assert slurm.submit(args).wait(timeout=600) == 0, slurm.log()[-3000:]  # the requeued job
    _assert_same_run(out, one_node)


def _rows(out: Path) -> list[dict]:
    """metrics.jsonl's complete lines so far (none before the file exists)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    return [json.loads(x) for x in lines if x.endswith("\n")]


def test_convert_names_the_ranks_whose_shards_are_missing(tmp_path, capsys):
    from dst_train.cli import main

    folder = tmp_path / "checkpoints" / checkpoint.tag_of(4)
    folder.mkdir(parents=True)
    (folder / checkpoint.COMPLETE).write_text("")
    (folder / checkpoint.RANKS).write_text('{"world_size": 3, "hosts": ["a", "b", "c"]}')
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert main(["convert", str(tmp_path), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "the ZeRO shards of rank 0 (host a), rank 2 (host c) are not here (3 ranks" in err
    assert f"copy the {folder.name} folder of every node into one" in err


def test_nodes_without_a_common_checkpoint_refuse_to_start(demo_root, tiny_model_dir, tmp_path):
    """Node 1's disk lost its checkpoints: it must not start from scratch beside node 0."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    disks = [tmp_path / f"node{i}" for i in (0, 1)]
    args = overrides(demo_root, tiny_model_dir, "run", "train.node_local_checkpoints=true")
    args += ["train.max_steps=2"]

    def run_nodes():
        port = free_port()
        procs = []
        for n, disk in enumerate(disks):
            disk.mkdir(exist_ok=True)
            procs.append(subprocess.Popen(
                [str(REPO / "launch/train_multinode.sh"), str(DEMO_YAML), *args], cwd=disk,
                env=_env(HOSTFILE=str(hostfile), NODE_RANK=str(n), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port),
                stdout=open(disk / "log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            ))  # fmt: skip
        return [
            (p.wait(timeout=600), (d / "log").read_text())
            for p, d in zip(procs, disks, strict=True)
        ]

    assert [rc for rc, _ in run_nodes()] == [0, 0]
    shutil.rmtree(disks[1] / "run" / "checkpoints")
    args[-1] = "train.max_steps=4"
    results = run_nodes()
    assert all(rc != 0 for rc, _ in results)
    assert any("no checkpoint is complete for every process" in log for _, log in results)
    assert not (disks[0] / "run" / "checkpoints" / checkpoint.tag_of(4)).exists()


def _agree(rank: int, port: int, root: str, complete: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    for case, per_rank in enumerate(complete):
        ckpt = Path(root) / f"case{case}" / f"rank{rank}"
        for step in per_rank[rank]:
            (ckpt / checkpoint.tag_of(step)).mkdir(parents=True)
            (ckpt / checkpoint.tag_of(step) / checkpoint.COMPLETE).write_text("")
        try:
            got = checkpoint.agreed_latest_tag(ckpt)
        except checkpoint.CheckpointMismatch as e:
            got = f"mismatch: {e}"
        Path(root, f"case{case}-rank{rank}.txt").write_text(str(got))
    torch.distributed.destroy_process_group()


def test_processes_agree_on_the_checkpoint_to_resume(tmp_path):
    cases = [
        ([2, 4], [2, 4]),  # the same: the latest
        ([2, 4, 6], [2, 4]),  # 6 saved on one node only (a crash between): the newest common
        ([], []),  # nothing anywhere: a fresh start
        ([2], []),  # one node lost its checkpoints: refuse
    ]
    torch.multiprocessing.spawn(_agree, args=(int(free_port()), str(tmp_path), cases), nprocs=2)
    got = [[(tmp_path / f"case{c}-rank{r}.txt").read_text() for r in (0, 1)] for c in range(4)]
    assert got[0] == [checkpoint.tag_of(4)] * 2
    assert got[1] == [checkpoint.tag_of(4)] * 2
    assert got[2] == ["None"] * 2
    assert all(
        g.startswith("mismatch: no checkpoint is complete for every process") for g in got[3]
    )
    assert "rank 1 on " in got[3][0] and ": none in " in got[3][0]


def _save_after_a_crash_between_nodes(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    ckpt = Path(root) / f"node{rank}" / "checkpoints"  # node-local: each node writes its own
    folder = ckpt / checkpoint.tag_of(2)
    if rank == 0:  # step 2's save finished on this node only, then the run crashed
        folder.mkdir(parents=True)
        (folder / "from_the_crashed_run").write_text("")
        (folder / checkpoint.COMPLETE).write_text("")
    for attempt in ("resumed", "again"):  # the resumed run saves step 2; then the same again
        checkpoint.save(
            FolderEngine(), ckpt, 2, {"step": 2}, "", 0, rank, torch.distributed.barrier, True
        )
        left = sorted(p.name for p in folder.iterdir())
        Path(root, f"{attempt}-rank{rank}.json").write_text(json.dumps(left))
    torch.distributed.destroy_process_group()


def test_a_checkpoint_complete_on_one_node_only_is_saved_again_on_every_node(tmp_path):
    args = (int(free_port()), str(tmp_path))
    torch.multiprocessing.spawn(_save_after_a_crash_between_nodes, args=args, nprocs=2)
    saved = ["COMPLETE", "config.yaml", "mp_rank_00_model_states.pt", "ranks.json", "rng_rank{}.pt",
             "trainer.json"]  # fmt: skip
    for rank in (0, 1):
        want = sorted(name.format(rank) for name in saved)
        for attempt in ("resumed", "again"):  # saved whole once; a complete save is kept as is
            got = json.loads((tmp_path / f"{attempt}-rank{rank}.json").read_text())
            assert got == want, (attempt, rank)
        latest = tmp_path / f"node{rank}" / "checkpoints" / checkpoint.LATEST
        assert latest.read_text() == checkpoint.tag_of(2)
