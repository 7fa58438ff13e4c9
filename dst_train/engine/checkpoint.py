"""Checkpoints: atomic, resumable, keep-last-K.

Layout under ``RUN/checkpoints/``::

    step_00000040/      DeepSpeed's files (model + optimizer shards of every rank), plus
        config.yaml     the resolved run config (a checkpoint carries what made it)
        trainer.json    step, epoch, batch position in the epoch
        ranks.json      the run's world size and each rank's host (where its shards were written)
        rng_rank{r}.pt  each rank's RNG states
        COMPLETE        written last
    latest              the tag of the newest complete checkpoint

A save writes everything into the new tag folder, waits for every rank, writes ``COMPLETE`` and
only then replaces ``latest`` (write-to-temp + ``os.replace``, atomic on POSIX). A crash at any
point before that leaves ``latest`` on the previous checkpoint; incomplete folders are removed at
the next save.

Nodes without a shared filesystem (``train.node_local_checkpoints``): DeepSpeed's node-local
storage makes each node write its own ranks' shards (and the model states) under its own
``output_dir``, and the first process of each node writes the files above there too. A resume
takes the newest checkpoint complete on every node; ``convert`` needs every node's shards in one
folder and names the ranks whose shards are missing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"
COMPLETE = "COMPLETE"
RANKS = "ranks.json"


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
    writer: bool | None = None,
) -> Path:
    """Save a complete checkpoint of ``engine`` at ``step`` (all ranks call this). ``writer``:
    this process writes the folder's own files (default: rank 0; with node-local checkpoints
    the first process of each node, see :func:`is_writer`)."""
    writer = rank == 0 if writer is None else writer
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step)
    folder = ckpt_dir / tag
    done_here = (folder / COMPLETE).is_file()
    seen = _gather((done_here, socket.gethostname()))  # every rank's (done, host)
    if all(done for done, _ in seen):  # already saved (same step, same state): keep it whole
        barrier()
        return folder
    if writer:
        if done_here:  # complete on this node only (a crash between nodes): saved again
            shutil.rmtree(folder)
        _remove_incomplete(ckpt_dir)  # a crashed save of this very step among them
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
    barrier()
    if writer:
        hosts = [host for _, host in seen]
        (folder / RANKS).write_text(json.dumps({"world_size": len(hosts), "hosts": hosts}))
        (folder / "config.yaml").write_text(config_text)
        (folder / "trainer.json").write_text(json.dumps(trainer_state))
        (folder / COMPLETE).write_text("")
        tmp = ckpt_dir / (LATEST + ".tmp")
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)  # the moment the new checkpoint becomes "the" one
        _keep_last(ckpt_dir, keep_last)
    barrier()
    return folder


def _gather(value) -> list:
    """``value`` of every rank, in rank order (all ranks call this; a lone process gets its own)."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def missing_shards(folder: str | Path) -> str | None:
    """What is missing for consolidating the checkpoint in ``folder`` (None: nothing): the
    ranks whose ZeRO optimizer shard is not there, e.g. a node-local run's other nodes."""
    folder = Path(folder)
    ranks_file = folder / RANKS
    if not ranks_file.is_file():  # written since node-local checkpoints; nothing to compare
        return None
    ranks = json.loads(ranks_file.read_text())
    gone = [
        r
        for r in range(ranks["world_size"])
        if not any(folder.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
    ]
    if not gone:
        return None
    where = ", ".join(f"rank {r} (host {ranks['hosts'][r]})" for r in gone)
    return (
        f"{folder}: the ZeRO shards of {where} are not here ({ranks['world_size']} ranks trained "
        "it). A run with train.node_local_checkpoints=true leaves each node's shards on that "
        f"node: copy the {folder.name} folder of every node into one (the file names do not "
        "clash) and convert that"
    )


def is_writer(rank: int, local_rank: int, node_local: bool) -> bool:
    """Whether this process writes a checkpoint's own files: rank 0 on a shared filesystem,
    each node's first process when every node keeps its own checkpoints."""
    return local_rank == 0 if node_local else rank == 0


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    return sorted(d.name for d in Path(ckpt_dir).glob("step_*") if (d / COMPLETE).is_file())


class CheckpointMismatch(RuntimeError):
    """The processes of a run do not see the same complete checkpoints."""


def agreed_latest_tag(ckpt_dir: str | Path) -> str | None:
    """:func:`latest_tag` as every process of the run sees it, agreed: the common choice, else
    the newest checkpoint complete for every process (a save a crash cut short on one node),
    else None when no process has one. Raises :class:`CheckpointMismatch` when some processes
    have checkpoints and others have none in common with them (a node's disk wiped, another
    ``output_dir``): starting those from scratch would silently train two different models."""
    seen = _gather((latest_tag(ckpt_dir), complete_tags(ckpt_dir), socket.gethostname(),
                    str(ckpt_dir)))  # fmt: skip
    choices = {latest for latest, *_ in seen}
    if len(choices) == 1:
        return choices.pop()
    common = set.intersection(*(set(tags) for _, tags, *_ in seen))
    if common:
        return max(common)
    listing = "; ".join(
        f"rank {r} on {host}: {', '.join(tags) or 'none'} in {path}"
        for r, (_, tags, host, path) in enumerate(seen)
    )
    raise CheckpointMismatch(
        f"no checkpoint is complete for every process ({listing}). With "
        "train.node_local_checkpoints=true each node resumes from its own output_dir: give every "
        "node the output_dir it trained with, or train.resume=never to start over"
    )


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
            _remove(d)


def _keep_last(ckpt_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted(d for d in ckpt_dir.glob("step_*") if (d / COMPLETE).is_file())
    for d in done[:-keep]:
        _remove(d)


def _remove(folder: Path) -> None:
    """Remove a checkpoint folder, its marker first: what a failed removal leaves (a file an NFS
    handle or a permission keeps) is an incomplete checkpoint, never resumed from, and removed
    again at the next save; a marker that cannot be removed leaves the folder whole, a complete
    checkpoint the next save prunes again. Either is named, not raised: the new checkpoint is
    saved, and housekeeping must not end the run."""
    try:
        (folder / COMPLETE).unlink(missing_ok=True)
    except OSError as e:
        _warn(f"{folder}: not removed ({COMPLETE} stays: {e}; the next save tries again)")
        return
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        _warn(f"{folder}: not removed entirely (left incomplete; the next save tries again)")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
