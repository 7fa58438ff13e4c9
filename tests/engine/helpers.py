"""Launch real multi-process DeepSpeed runs (gloo on CPU) the way users do."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_YAML = REPO / "launch" / "configs" / "demo.yaml"


def free_port() -> str:
    from dst_train.engine.trainer import free_port as trainer_free_port

    return str(trainer_free_port())


def base_overrides(demo_root, tiny_model_dir, out) -> list[str]:
    return [
        f"data.root={demo_root}",
        f"model.arch={tiny_model_dir}",
        f"output_dir={out}",
        "train.max_steps=6",
        "train.warmup_steps=2",
        "train.lr=0.003",
        "train.eval_every=3",
        "train.eval_batches=1",
        "train.tensorboard=false",
    ]


def train_command(overrides, launcher="deepspeed", nproc=2) -> list[str]:
    port = free_port()
    if launcher == "deepspeed":
        head = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(nproc),
            "--master_port",
            port,
            "--module",
        ]
    elif launcher == "torchrun":
        head = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            port,
            "-m",
        ]
    else:
        head = [sys.executable, "-m"]
    return [*head, "dst_train.cli", "train", "--config", str(DEMO_YAML), *overrides]


def run_training(overrides, launcher="deepspeed", nproc=2, timeout=600):
    proc = subprocess.run(
        train_command(overrides, launcher, nproc),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def run_scenario(script, demo_root, tiny_model_dir, out, specs, nproc=1):
    """Run a ``tests/engine/scenario_*.py`` script (plain python for one process, torchrun for
    more); returns (the finished process, its ``RESULT {json}`` records, seconds)."""
    head = [sys.executable]
    if nproc > 1:
        head += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        head += ["--master_port", free_port()]
    start = time.perf_counter()
    proc = subprocess.run(
        [*head, str(script), str(demo_root), str(tiny_model_dir), str(out), *specs],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    found = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return proc, found, time.perf_counter() - start


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def final_state(out: Path) -> dict:
    """Consolidated fp32 weights of the run's latest checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dst_train.engine.convert import locate

    ckpt_dir, tag = locate(out)
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


class FolderEngine:
    """Stands in for the DeepSpeed engine's save (one file per tag): what keep-last and the
    checkpoint protocol see."""

    def save_checkpoint(self, ckpt_dir, tag, save_latest):
        (Path(ckpt_dir) / tag).mkdir(parents=True)
        (Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"")
