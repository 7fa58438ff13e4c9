"""Checkpoints: atomic, resumable, keep-last-K.

Layout under ``RUN/checkpoints/``::

    step_00000040/      DeepSpeed's files (model + optimizer shards of every rank), plus
        config.yaml     the resolved run config (a checkpoint carries what made it)
        trainer.json    step, epoch, batch position in the epoch
        rng_rank{r}.pt  each rank's RNG states
        COMPLETE        written last
    latest              the tag of the newest complete checkpoint

A save writes everything into the new tag folder, waits for every rank, writes ``COMPLETE`` and
only then replaces ``latest`` (write-to-temp + ``os.replace``, atomic on POSIX). A crash at any
point before that leaves ``latest`` on the previous checkpoint; incomplete folders are removed at
the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"
COMPLETE = "COMPLETE"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag named by ``latest`` if that checkpoint is complete; else the newest complete
    checkpoint folder (``latest`` missing, torn or naming a folder a crash left half-written);
    None when there is no complete checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / LATEST
    if path.is_file():
        tag = path.read_text().strip()
        if tag and (ckpt_dir / tag / COMPLETE).is_file():
            return tag
    done = sorted(d.name for d in ckpt_dir.glob("step_*") if (d / COMPLETE).is_file())
    return done[-1] if done else None


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    engine,
    ckpt_dir: str | Path,
    step: int,
    trainer_state: dict,
    config_text: str,
    keep_last: int,
    rank: int,
    barrier,
) -> Path:
    """Save a complete checkpoint of ``engine`` at ``step`` (all ranks call this)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step)
    folder = ckpt_dir / tag
    if (folder / COMPLETE).is_file():  # already saved (same step, same state): keep it whole
        barrier()
        return folder
    if rank == 0:
        _remove_incomplete(ckpt_dir)  # a crashed save of this very step among them
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        (folder / "config.yaml").write_text(config_text)
        (folder / "trainer.json").write_text(json.dumps(trainer_state))
        (folder / COMPLETE).write_text("")
        tmp = ckpt_dir / (LATEST + ".tmp")
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)  # the moment the new checkpoint becomes "the" one
        _keep_last(ckpt_dir, keep_last)
    barrier()
    return folder


def load(engine, ckpt_dir: str | Path, tag: str, rank: int) -> dict:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; return trainer state."""
    folder = Path(ckpt_dir) / tag
    load_path, _ = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"{folder}: DeepSpeed could not load this checkpoint")
    rng = folder / f"rng_rank{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((folder / "trainer.json").read_text())


def _remove_incomplete(ckpt_dir: Path) -> None:
    for d in ckpt_dir.glob("step_*"):
        if d.is_dir() and not (d / COMPLETE).is_file():
            shutil.rmtree(d, ignore_errors=True)


def _keep_last(ckpt_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted(d for d in ckpt_dir.glob("step_*") if (d / COMPLETE).is_file())
    for d in done[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
