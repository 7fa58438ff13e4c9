"""Peak memory and time of the LM loss: selective logits (labelled positions only) vs full logits.

    python benchmarks/loss_memory.py            # SmolVLM2-2.2B shapes: hidden 2048, vocab 49280,
                                                # seq 4096, 5 % labelled tokens; CPU (+ GPU if any)
    python benchmarks/loss_memory.py --smoke    # small shapes, for the tests

Each (device, mode) runs forward + backward of the loss from the LM's last hidden states in a
fresh subprocess, so the CPU peak (max RSS above the post-setup RSS) belongs to that mode alone.
On a GPU, torch's peak allocated bytes above the post-setup level are used.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table, write_result  # noqa: E402

MIB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def run_mode(
    mode: str, device: str, hidden: int, vocab: int, seq: int, frac: float, repeats: int
) -> dict:
    """One measurement in this process: returns peak extra bytes and median seconds."""
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.float16
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device, dtype)
    h = torch.randn(1, seq, hidden, device=device, dtype=dtype, requires_grad=True)
    targets = torch.full((1, seq), -100, device=device)
    labelled = torch.randperm(seq, device=device)[: int(frac * seq)]
    targets[0, labelled] = torch.randint(0, vocab, (len(labelled),), device=device)

    def step():
        if mode == "full":
            logits = head(h).float()  # (1, T, V): the whole vocabulary at every position
            loss = F.cross_entropy(logits.view(-1, vocab), targets.view(-1), ignore_index=-100)
        else:
            where = targets != -100
            logits = head(h[where]).float()  # (N, V): labelled positions only
            loss = F.cross_entropy(logits, targets[where])
        loss.backward()
        h.grad = None
        head.weight.grad = None

    step()  # warm-up (allocator, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times.sort()
    return {
        "device": device,
        "mode": mode,
        "peak_mib": max(peak, 0) / MIB,
        "median_s": times[len(times) // 2],
        "labelled_tokens": int(frac * seq),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=49280)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--labelled", type=float, default=0.05, help="fraction of labelled tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.vocab, args.seq, args.repeats = 64, 1000, 512, 2
    shape = (args.hidden, args.vocab, args.seq, args.labelled, args.repeats)
    if args.one:  # child process: one measurement, JSON on stdout
        print(json.dumps(run_mode(*args.one, *shape)))
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for mode in ("selective", "full"):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                mode,
                device,
                "--hidden",
                str(args.hidden),
                "--vocab",
                str(args.vocab),
                "--seq",
                str(args.seq),
                "--labelled",
                str(args.labelled),
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    ratios = []
    for device in devices:
        sel, full = (
            next(r for r in rows if r["device"] == device and r["mode"] == m)
            for m in ("selective", "full")
        )
        ratios.append(
            {
                "device": device,
                "full_over_selective_memory": full["peak_mib"] / max(sel["peak_mib"], 1e-9),
                "full_over_selective_time": full["median_s"] / sel["median_s"],
            }
        )
    print(table(rows, ["device", "mode", "labelled_tokens", "peak_mib", "median_s"]))
    print()
    print(table(ratios, list(ratios[0])))
    path = write_result(
        "loss_memory_smoke" if args.smoke else "loss_memory",
        {
            "shape": {
                "hidden": args.hidden,
                "vocab": args.vocab,
                "seq": args.seq,
                "labelled_fraction": args.labelled,
            },
            "rows": rows,
            "ratios": ratios,
        },
        Path(args.out) if args.out else None,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
