"""Our micro-batch autotuner vs a doubling + binary-search baseline (Lightning's "binsearch"),
on the same model, data, DeepSpeed config and probe (full training steps on the worst case).

    python benchmarks/autotune_bench.py --smoke      # tiny model, CPU (RSS), for the tests
    python benchmarks/autotune_bench.py --arch smolvlm2-2.2b --data DATA --target-gb 24 \\
        [--fraction 0.9] [--verify-steps 100]        # GPU: random weights, fp16 + SDPA, 24 GB cap

Each method runs in its own process (CPU RSS never goes down inside one, and a fresh CUDA
allocator is fair to both). Reported per method: probes, seconds, the chosen micro-batch, its
peak over the target; then ``verify-steps`` steps at the chosen size in another fresh process
(peak, any OOM). The
peaks of every probe of both methods are kept as a recorded memory curve (the search tests use
it). In smoke mode the limit is placed so that about 8 samples fit (from two calibration
probes that are not counted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table, write_result  # noqa: E402
from dst_train.engine.trainer import exit_with_result  # noqa: E402

GiB = 2**30


def _prober(args):
    """The engine (micro-batch 1) and the worst-case probe, built as ``dst-train autotune`` does."""
    import copy

    from dst_train.config import load_config
    from dst_train.engine.trainer import init_distributed, setup
    from dst_train.tune.autotune import (
        Prober,
        apply_emulation,
        emulate_target,
        sample_cost,
        worst_case_index,
    )

    cfg = load_config(args.config, json.loads(args.overrides))
    _, _, device = init_distributed(cfg)
    emulated = emulate_target(int(args.target_gb * GiB), 0, turing=True)  # a Titan RTX
    apply_emulation(cfg, emulated)
    probe_cfg = copy.deepcopy(cfg)
    probe_cfg.train.micro_batch_size = probe_cfg.train.grad_accum = 1
    s = setup(probe_cfg)
    ds = s["train_ds"]
    worst = worst_case_index(ds, sample_cost(cfg, s))
    return Prober(s["engine"], ds[worst], s["step_collate"], device), emulated


def child(args) -> dict:
    """One method in this process; returns its record."""
    from dst_train.tune.search import NothingFits, doubling_search, search

    prober, emulated = _prober(args)
    if args.method == "calibrate":
        return {"probes": [asdict(prober(1)), asdict(prober(4))]}
    if args.method == "verify":  # `verify_steps` steps at a given size (e.g. autotune's choice)
        prober.steps, prober.stop_at = args.verify_steps, args.stop_at or None
        return {"emulated": emulated, **asdict(prober(args.max_micro))}
    limit = args.limit_bytes
    t0 = time.perf_counter()
    method = search if args.method == "ours" else doubling_search
    try:
        result = method(prober, limit, max_micro=args.max_micro)
    except NothingFits as err:
        return {
            "method": args.method,
            "error": str(err),
            "probes": [asdict(p) for p in err.result.probes],
        }
    seconds = time.perf_counter() - t0
    record = {
        "method": args.method,
        "emulated": emulated,
        "seconds": seconds,
        "probes": [asdict(p) for p in result.probes],
        "micro_batch": result.micro_batch,
        "peak_bytes": result.peak_bytes,
        "limit_bytes": limit,
    }
    return record


def calibrate(overrides: list[str], target_gb: float, config: str | None = None) -> int:
    """Smoke mode: a limit where about 8 samples fit, from probes at 1 and 4 (not counted)."""
    out = _spawn("calibrate", overrides, target_gb, 0, 0, 8, config)
    p1, p4 = (p["peak_bytes"] for p in out["probes"])
    return int(p1 + 8 * (p4 - p1) / 3)


def _spawn(method, overrides, target_gb, limit, verify, max_micro, config=None) -> dict:
    """``method`` in a fresh process; ``verify`` with ``max_micro`` runs that size only."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--method",
        method,
        "--overrides",
        json.dumps(overrides),
        "--target-gb",
        str(target_gb),
        "--limit-bytes",
        str(limit),
        "--verify-steps",
        str(verify),
        "--max-micro",
        str(max_micro),
        *(["--config", config] if config else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def smoke_overrides(tmp: Path, videos: int = 6, image_size: int = 32) -> list[str]:
    """Demo data and a tiny model under ``tmp``; the overrides that point a run at them."""
    from dst_train.data.synthetic import DemoSpec, make_demo_data
    from dst_train.model.tiny import demo_corpus, make_tiny_model

    make_demo_data(tmp / "data", seed=1, spec=DemoSpec(videos=videos, image_size=image_size))
    make_tiny_model(tmp / "tiny", demo_corpus(tmp / "data"), seed=0)
    return [
        f"data.root={tmp / 'data'}",
        f"model.arch={tmp / 'tiny'}",
        f"output_dir={tmp / 'run'}",
        "model.cpu_dtype=fp32",
        "train.tensorboard=false",
    ]


def gpu_overrides(data: str, arch: str, tmp: Path) -> list[str]:
    """A real architecture with random weights, the 2.2B recipe's memory options."""
    return [
        f"data.root={data}",
        f"model.arch={arch}",
        "model.pretrained=false",
        "model.gradient_checkpointing=true",
        "model.freeze_vision=true",
        f"output_dir={tmp / 'run'}",
        "train.tensorboard=false",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--arch", default="smolvlm2-2.2b", help="architecture name or model folder")
    ap.add_argument("--data", help="dataset root (GPU mode)")
    ap.add_argument("--config", help="run config YAML under the overrides (e.g. a recipe)")
    ap.add_argument("--name", help="result file name (default autotune_bench[_smoke])")
    ap.add_argument("--target-gb", type=float, default=24.0)
    ap.add_argument("--fraction", type=float, default=0.9)
    ap.add_argument("--verify-steps", type=int, default=100)
    ap.add_argument("--max-micro", type=int, default=256)
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", help=argparse.SUPPRESS)
    ap.add_argument("--limit-bytes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--stop-at", type=float, default=0.0, help=argparse.SUPPRESS)  # epoch s
    args = ap.parse_args()
    if args.child:
        exit_with_result(child(args))
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            overrides = smoke_overrides(Path(tmp))
            limit = calibrate(overrides, args.target_gb, args.config)
            verify, max_micro = 3, 64
        else:
            overrides = gpu_overrides(args.data, args.arch, Path(tmp))
            limit = int(args.fraction * args.target_gb * GiB)
            verify, max_micro = args.verify_steps, args.max_micro
        runs = [
            _spawn(m, overrides, args.target_gb, limit, 0, max_micro, args.config)
            for m in ("ours", "doubling")
        ]
        for r in runs:  # each choice checked in a fresh process: a fresh engine and allocator
            if verify and r.get("micro_batch"):
                check = _spawn(
                    "verify", overrides, args.target_gb, 0, verify, r["micro_batch"], args.config
                )
                r["verify"] = {"steps": verify, **check}
    rows, curve = [], {}
    for r in runs:
        for p in r["probes"]:
            if not p["oom"]:
                curve[p["micro_batch"]] = p["peak_bytes"]
        rows.append(
            {
                "method": r["method"],
                "probes": len(r["probes"]),
                "seconds": r.get("seconds"),
                "micro_batch": r.get("micro_batch"),
                "peak_gib": r.get("peak_bytes", 0) / GiB,
                "peak_over_target": r.get("peak_bytes", 0) / (args.target_gb * GiB),
                "peak_over_limit": r.get("peak_bytes", 0) / limit,
                "verify_oom": r.get("verify", {}).get("oom"),
                "verify_peak_over_limit": r.get("verify", {}).get("peak_bytes", 0) / limit,
            }
        )
    print(table(rows, list(rows[0])))
    ours, base = rows
    ratios = {
        "probes_ours_over_baseline": ours["probes"] / base["probes"],
        "seconds_ours_over_baseline": (ours["seconds"] or 0) / (base["seconds"] or 1),
    }
    print(json.dumps(ratios))
    name = args.name or ("autotune_bench_smoke" if args.smoke else "autotune_bench")
    path = write_result(
        name,
        {
            "mode": "smoke (CPU RSS)" if args.smoke else "gpu",
            "target_gb": args.target_gb,
            "limit_bytes": limit,
            "rows": rows,
            "ratios": ratios,
            "runs": runs,
            "recorded_curve": {str(k): v for k, v in sorted(curve.items())},
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
