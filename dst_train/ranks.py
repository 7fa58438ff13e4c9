"""The processes of a job that is not training (``evaluate``, ``cache-features``): one, or one
per GPU when a launcher started several.

``deepspeed --num_gpus 2 --module dst_train.cli evaluate ...`` (or torchrun) starts the same
command in every process, with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. Each process then
takes every ``world``-th item of a list (clips to stream, val samples to score, videos to cache),
and the pieces are gathered on every rank (pickled, over a gloo group: the results are host
objects). The items need no communication between them, so the only waits are at the gathers.
"""

from __future__ import annotations

import datetime
import os

import torch

# A rank waits at a gather for the slowest rank's share (hours on a big test split).
# If a rank dies, the launcher stops the others, so the wait never needs the timeout.
GATHER_TIMEOUT = datetime.timedelta(days=7)


def inference_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` = this process's GPU (the first, or the ``local_rank``-th when a launcher started
    one process per GPU) when one is visible, else the CPU; ``cuda`` = this process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    dev = torch.device(device)  # raises RuntimeError on a malformed name
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is visible")
    return dev


class Ranks:
    """This process's place among the job's processes (a context manager: it joins the
    group on entry and leaves it on exit)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world} processes")
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self._joined = False

    @classmethod
    def from_launcher(cls) -> Ranks:
        """What the launcher set (torchrun, deepspeed); one process when it set nothing."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        return cls(int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)))

    def __enter__(self) -> Ranks:
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                "gloo", rank=self.rank, world_size=self.world, timeout=GATHER_TIMEOUT
            )
            self._joined = True
        return self

    def __exit__(self, *exc) -> None:
        if self._joined:
            torch.distributed.destroy_process_group()
            self._joined = False

    @property
    def main(self) -> bool:
        """The process that writes what all made (the report, the cache's index)."""
        return self.rank == 0

    def share(self, items: list) -> list:
        """This process's items: every ``world``-th, from its rank on (lengths vary, so a block
        per rank could leave one rank the long ones)."""
        return items[self.rank :: self.world]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def device(self, name: str = "auto") -> torch.device:
        """Where this process computes (``inference_device`` with its local rank); a GPU is also
        made the current device, so what a library makes on "cuda" lands on this process's."""
        dev = inference_device(name, self.local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return dev

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()
