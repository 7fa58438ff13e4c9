"""Stopping on a signal: the run saves where it is and exits, and the same command resumes.

A scheduler's preemption or time limit (SLURM, Kubernetes: SIGTERM, then SIGKILL after a grace
period), SLURM's early warning (``#SBATCH --signal=USR1@SECONDS``: SIGUSR1), a launcher passing
on a Ctrl-C (SIGTERM) or Ctrl-C itself (SIGINT) would otherwise kill the ranks and lose every
step since the last periodic checkpoint. Here the signal only sets a flag. Before each
micro-step and each val-loss batch the ranks agree on it (one 1-element all-reduce: a signal that
reached one rank stops them all at the same point), and when it is set they abandon the optimizer
step (or val pass) in progress, save the state as it was after the last completed step, and exit
with :data:`EXIT_CODE`.

Abandoning the window makes the stop exact and quick: the parameters and optimizer state have not
moved since the last optimizer step (only gradients were accumulated, and they are dropped), the
data position and the RNG are taken back to the window's start, so the resumed run trains that
window again as the uninterrupted run did. The wait is at most one micro-step, then one save.

Repeated signals change nothing (SLURM signals every process and the launcher passes the signal
on, so a rank often gets two); a second Ctrl-C (SIGINT) stops at once, without saving.
"""

from __future__ import annotations

import signal

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# sysexits.h EX_TEMPFAIL ("try again later"): stopped early, the checkpoint saved; the same
# command resumes. launch/slurm.sbatch requeues the job on it
EXIT_CODE = 75


class StopRequested(Exception):  # noqa: N818 — a request, not an error
    """Raised at a micro-step boundary when the ranks agreed to stop; ``str()`` names the signal."""


class StopRequest:
    """Signal handlers for the training loop (a context manager: installed on entry, the
    previous handlers restored on exit; main thread only, as Python's handlers are)."""

    def __init__(self, device: torch.device, world: int = 1):
        self.device, self.world = device, world
        self.signal: str | None = None  # the first signal's name
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        # no printing here: a handler that writes can interrupt a write to the same stream
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: now
        self.signal = self.signal or name

    def agreed(self) -> str | None:
        """None to go on; else why to stop: this rank's signal, or "a signal on another rank".
        Every rank calls it at the same point of the loop (a collective when world > 1)."""
        if self.world == 1:
            return self.signal
        flag = torch.tensor([float(self.signal is not None)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item():
            return None
        return self.signal or "a signal on another rank"
