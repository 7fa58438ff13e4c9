"""Run metrics: one JSON line per logged step (``metrics.jsonl``), TensorBoard, a tqdm bar on rank
0, and the loss-curve PNG at the end. Other ranks log nothing."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dst_train.atomic_io import write_text_atomic

LOSSES = ("loss", "speak_loss", "update_loss", "response_loss", "dst_loss")


class LogWindow:
    """The optimizer steps since the previous metrics line (``train.log_every`` of them).

    Each step's sums — ``LOSSES``, then tokens and samples: a (len(LOSSES) + 2,) tensor on the
    run's device — are added where they are; the line reads them back once. Between two lines
    the host does not wait for the GPU, so one step's own time says little (its kernels may
    still be queued, or it may pay for earlier steps'): the line's rates are the window's tokens
    and samples over the window's time, val passes and saves left out (``paused``), and
    ``step_time_s`` is that time over its steps. The losses are the logged step's."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.start = clock()
        self.sums = self.last = None
        self.steps = 0

    def add(self, sums: torch.Tensor) -> None:
        self.last = sums
        self.sums = sums if self.sums is None else self.sums + sums
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not the steps' (a val pass, a save)."""
        began = self.clock()
        try:
            yield
        finally:
            self.start += self.clock() - began

    def line(self, all_reduce, micro_steps: int) -> dict:
        """The metrics of the window (every rank calls it: ``all_reduce`` sums over the ranks);
        ``micro_steps``: micro-steps per optimizer step, all ranks together (the losses are
        their mean). The next window starts here."""
        values = all_reduce(torch.cat([self.last[:-2], self.sums[-2:]])).tolist()  # waits
        seconds = self.clock() - self.start
        row = {k: values[i] / micro_steps for i, k in enumerate(LOSSES)}
        row.update(
            tokens_per_s=values[-2] / seconds,
            samples_per_s=values[-1] / seconds,
            step_time_s=seconds / self.steps,
        )
        self.start, self.sums, self.last, self.steps = self.clock(), None, None, 0
        return row


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows up to ``step``: rows a killed run logged after its last checkpoint are
    logged again by the resumed run (atomic rewrite; a torn last line is dropped too)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a kill cut short
        if row.get("step", 0) <= step:
            kept.append(line)
    write_text_atomic(path, "".join(x + "\n" for x in kept))


class MetricsLogger:
    def __init__(
        self,
        out_dir: Path,
        active: bool,
        tensorboard: bool,
        start_step: int,
        total: int,
        resumed: bool,
    ):
        self.active = active
        self.out_dir = out_dir
        self.path = out_dir / "metrics.jsonl"
        self.bar = None
        self.tb = None
        if not active:
            return
        if not resumed and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log; a resumed one appends
        elif self.path.exists():
            drop_rows_after(self.path, start_step)
        self.fh = self.path.open("a")
        self.bar = tqdm(
            total=total,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 15.0,  # a log file: a line per 15 s
        )
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def _write(self, row: dict) -> None:
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind"):
                    self.tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])

    def train(self, step: int, row: dict) -> None:
        if not self.active:
            return
        self._write({"kind": "train", "step": step, **row})
        # update() (not refresh()) keeps tqdm's rate limit: a log file gets a line per second at
        # most, not one per step
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", refresh=False)
        self.bar.update(step - self.bar.n)

    def eval(self, step: int, row: dict) -> None:
        if not self.active:
            return
        self._write({"kind": "eval", "step": step, **row})
        self.bar.write(f"step {step}: val loss {row['val_loss']:.4f}")

    def close(self) -> None:
        if not self.active:
            return
        self.bar.close()
        self.fh.close()
        if self.tb is not None:
            self.tb.close()
        plot_losses(self.path, self.out_dir / "loss_curve.png")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png: Path) -> Path:
    """Every loss term against the optimizer step (train lines, val as markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in LOSSES:
        ax.plot(
            [r["step"] for r in train],
            [r[key] for r in train],
            label=key,
            lw=2 if key == "loss" else 1,
        )
        if val:
            ax.plot(
                [r["step"] for r in val],
                [r[f"val_{key}"] for r in val],
                "o",
                color=ax.lines[-1].get_color(),
                ms=4,
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (dots: val)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
