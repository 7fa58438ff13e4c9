"""Train loader: a micro-batch read by one worker (the DataLoader handed the batch sampler) vs by
every worker (``sample_loader``: single samples, regrouped by ``batches_forever``), and the
latter with one iterator for the run (the trainer's) vs a new one, and new workers, each epoch
(the trainer's until 2026-11-27).

    python benchmarks/train_loader.py             # demo data with 384-px frames, 2 workers
    python benchmarks/train_loader.py --step-s 3 --epochs 4   # the epoch restarts' cost
    python benchmarks/train_loader.py --smoke     # tiny, for the tests

Every layout reads the same batches of the real train dataset (``prepare``: frames decoded from
the Arrow files and run through the model's image processor in the workers) for ``--epochs``
epochs; the batch layout makes one iterator per epoch. The consumer holds each batch for
``--step-s`` seconds, a stand-in for the GPU step the loader has to keep up with. Measured per
layout: seconds to the first batch, frames/s over the run, and the share of the run the
consumer spent waiting for batches. The ratios are the sample layout over the batch layout.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table, write_result  # noqa: E402


def _setup(tmp: Path, args):
    from benchmarks.autotune_bench import smoke_overrides
    from dst_train.config import load_config
    from dst_train.engine.trainer import init_distributed, prepare

    overrides = smoke_overrides(tmp, args.videos, args.size)
    cfg = load_config(None, [*overrides, f"train.micro_batch_size={args.micro}"])
    init_distributed(cfg)
    return prepare(cfg)


def batch_layout(s: dict, workers: int):
    """The DataLoader handed the batch sampler: one worker reads a whole micro-batch."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        s["train_ds"], batch_sampler=s["sampler"], collate_fn=list, num_workers=workers
    )
    epoch = 0
    while True:
        s["sampler"].set_epoch(epoch)
        yield from loader
        epoch += 1


def sample_layout(s: dict, workers: int):
    """The trainer's loader: every worker reads samples of the same micro-batch."""
    from dst_train.engine.trainer import batches_forever, sample_loader

    loader = sample_loader(s["train_ds"], s["sampler"], workers)
    return (items for _, _, items in batches_forever(loader, s["sampler"], 0, 0))


def restarted_layout(s: dict, workers: int):
    """The trainer's loader with a new iterator each epoch: its workers start cold each time."""
    from dst_train.engine.trainer import batches_forever, sample_loader

    loader = sample_loader(s["train_ds"], s["sampler"], workers)
    for epoch in itertools.count():
        one_epoch = itertools.islice(
            batches_forever(loader, s["sampler"], epoch, 0), len(s["sampler"])
        )
        yield from (items for _, _, items in one_epoch)


def measure(name: str, stream, batches: int, step_s: float) -> dict:
    t0 = time.perf_counter()
    waited, frames, first = 0.0, 0, None
    for _ in range(batches):
        w0 = time.perf_counter()
        items = next(stream)
        waited += time.perf_counter() - w0
        first = first if first is not None else time.perf_counter() - t0
        frames += sum(len(it["frames"]) for it in items)
        time.sleep(step_s)  # the GPU step's stand-in
    total = time.perf_counter() - t0
    return {
        "layout": name,
        "batches": batches,
        "frames": frames,
        "first_batch_s": first,
        "seconds": total,
        "frames_per_s": frames / total,
        "wait_share": waited / total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--size", type=int, default=384, help="frame pixels (square)")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--step-s", type=float, default=0.5)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    if args.smoke:
        args.videos, args.size, args.micro, args.epochs, args.step_s = 6, 32, 2, 1, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        s = _setup(Path(tmp), args)
        batches = args.epochs * len(s["sampler"])
        rows = [
            measure("batch per worker", batch_layout(s, args.workers), batches, args.step_s),
            measure("sample per worker", sample_layout(s, args.workers), batches, args.step_s),
            measure(
                "sample per worker, restarted each epoch",
                restarted_layout(s, args.workers),
                batches,
                args.step_s,
            ),
        ]
    print(
        table(
            rows,
            ["layout", "batches", "frames", "first_batch_s", "frames_per_s", "wait_share"],
        )
    )
    base, ours, restarted = rows
    ratios = {
        "first_batch_s_sample_over_batch": ours["first_batch_s"] / base["first_batch_s"],
        "frames_per_s_sample_over_batch": ours["frames_per_s"] / base["frames_per_s"],
        "seconds_one_iterator_over_restarted": ours["seconds"] / restarted["seconds"],
        "wait_share_one_iterator_over_restarted": ours["wait_share"]
        / max(restarted["wait_share"], 1e-9),
    }
    print(ratios)
    path = write_result(
        "train_loader_smoke" if args.smoke else "train_loader",
        {"settings": vars(args), "rows": rows, "ratios": ratios},
        Path(args.out) if args.out else None,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
