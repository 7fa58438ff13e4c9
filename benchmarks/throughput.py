"""Training throughput and memory: our DeepSpeed loop vs the Hugging Face Trainer driving the same
DeepSpeed config, model and data (the HF Trainer lives in this benchmark only).

    python benchmarks/throughput.py --smoke     # tiny model, CPU, 1 process (for the tests)
    python benchmarks/throughput.py --arch smolvlm2-2.2b --data DATA --target-gb 24 \\
        [--micro-batch 4] [--steps 30]         # GPU: random weights, fp16 + SDPA, 24 GB cap

Each stack runs in its own process: ``--steps`` optimizer steps at ``--micro-batch`` (the first
``--warmup`` not timed) → tokens/s, samples/s, peak memory, MFU (6 × trainable parameters ×
tokens/s over the GPU's dense fp16/bf16 peak; GPU only). Then, for each stack, the largest
micro-batch under the same memory cap (our search over full training steps on the worst-case
sample; the HF Trainer is rebuilt for every probe, as it must be).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.autotune_bench import gpu_overrides, smoke_overrides  # noqa: E402
from benchmarks.common import table, write_result  # noqa: E402

GiB = 2**30
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TITAN RTX": 130.0, "L40": 181.0}


def _build(args, micro: int, engine: bool = True):
    from dst_train.config import load_config
    from dst_train.engine.trainer import init_distributed, prepare, setup
    from dst_train.tune.autotune import emulate_target

    cfg = load_config(None, json.loads(args.overrides))
    cfg.train.micro_batch_size, cfg.train.grad_accum = micro, 1
    cfg.train.max_steps = args.steps
    init_distributed(cfg)
    emulate_target(cfg, int(args.target_gb * GiB), 0)
    return cfg, (setup if engine else prepare)(cfg)


def _mfu(trainable: int, tokens_per_s: float) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).upper()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None if peak is None else 6 * trainable * tokens_per_s / (peak * 1e12)


def run_ours(args, micro: int, steps: int) -> dict:
    """Our loop (the trainer's own micro-step runner) for ``steps`` optimizer steps."""
    from dst_train.engine.trainer import MicroBatchRunner, batches_forever
    from dst_train.tune.memory import PeakMemory

    cfg, s = _build(args, micro)
    runner = MicroBatchRunner(s["engine"], s["collate"], s["device"], False, micro, 1, 0)
    stream = batches_forever(s["loader"], s["sampler"], 0, 0)
    tokens = samples = 0
    with PeakMemory(s["device"]) as mem:
        for i in range(steps):
            if i == args.warmup:
                t0 = time.perf_counter()
                tokens = samples = 0
            sums = runner.run_window([next(stream)[2]])
            tokens, samples = tokens + sums[-2].item(), samples + sums[-1].item()
    dt = time.perf_counter() - t0
    trainable = sum(p.numel() for p in s["model"].parameters() if p.requires_grad)
    return {
        "tokens_per_s": tokens / dt,
        "samples_per_s": samples / dt,
        "peak_bytes": mem.peak_bytes,
        "trainable": trainable,
        "mfu": _mfu(trainable, tokens / dt),
    }


def run_hf(args, micro: int, steps: int, worst_only: bool = False) -> dict:
    """The HF Trainer with our resolved DeepSpeed config, the same model, data and collate."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from dst_train.tune.autotune import sample_cost, worst_case_index
    from dst_train.tune.memory import PeakMemory

    cfg, s = _build(args, micro, engine=False)
    ds_config = copy.deepcopy(s["ds_config"])
    model, dataset, collate = s["model"], s["train_ds"], s["collate"]
    if worst_only:
        worst = worst_case_index(dataset, sample_cost(cfg, s))
        dataset.samples = [dataset.samples[worst]] * (micro * steps)
    counts = {"tokens": 0, "samples": 0}

    def counting_collate(items):
        batch = collate(items)
        if counts.get("timing"):
            counts["tokens"] += int(batch["attention_mask"].sum())
            counts["samples"] += batch["input_ids"].shape[0]
        return batch

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup and "t0" not in counts:
                counts.update(t0=time.perf_counter(), timing=True)

    t = cfg.train
    hf_args = TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "hf"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=t.lr,
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        weight_decay=t.weight_decay,
        max_grad_norm=t.grad_clip,
        warmup_steps=0,
        lr_scheduler_type="constant",
        fp16=ds_config.get("fp16", {}).get("enabled", False) is True,
        bf16=ds_config.get("bf16", {}).get("enabled", False) is True,
        deepspeed=ds_config,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=hf_args,
        train_dataset=dataset,
        data_collator=counting_collate,
        callbacks=[Timer()],
    )
    oom = False
    started = time.perf_counter()
    with PeakMemory(trainer.args.device) as mem:
        try:
            trainer.train()
        except torch.OutOfMemoryError:
            oom = True
    dt = time.perf_counter() - counts.get("t0", time.perf_counter())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "seconds": time.perf_counter() - started,  # the whole train() call, warm-up included
        "tokens_per_s": counts["tokens"] / dt if dt else 0.0,
        "samples_per_s": counts["samples"] / dt if dt else 0.0,
        "peak_bytes": mem.peak_bytes,
        "oom": oom,
        "trainable": trainable,
        "mfu": _mfu(trainable, counts["tokens"] / dt) if dt else None,
    }


def probe_ours(args) -> dict:
    """Largest micro-batch of our loop under the cap (the autotuner's search and probe)."""
    from dst_train.data.collate import make_collate
    from dst_train.tune.autotune import Prober, sample_cost, worst_case_index
    from dst_train.tune.search import search

    cfg, s = _build(args, 1)
    ds = s["train_ds"]
    prober = Prober(
        s["engine"],
        ds[worst_case_index(ds, sample_cost(cfg, s))],
        make_collate(s["tokenizer"].pad_token_id, bool(cfg.data.feature_cache)),
        s["device"],
    )
    r = search(prober, args.limit_bytes, max_micro=args.max_micro)
    return {"micro_batch": r.micro_batch, "probes": len(r.probes)}


def _spawn(role: str, args, **extra) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        role,
        "--overrides",
        args.overrides,
        "--target-gb",
        str(args.target_gb),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--micro-batch",
        str(extra.get("micro", args.micro_batch)),
        "--limit-bytes",
        str(args.limit_bytes or 0),
        "--max-micro",
        str(args.max_micro),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    if proc.returncode != 0:
        raise RuntimeError(f"{role} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def probe_hf(args) -> dict:
    """Largest micro-batch of the HF Trainer under the cap: same search, one process per probe."""
    from dst_train.tune.search import Probe, search

    def measure(b: int) -> Probe:
        r = _spawn("hf_worst", args, micro=b)
        return Probe(b, r["peak_bytes"], r["seconds"], oom=r["oom"])

    r = search(measure, args.limit_bytes, max_micro=args.max_micro)
    return {"micro_batch": r.micro_batch, "probes": len(r.probes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--arch", default="smolvlm2-2.2b")
    ap.add_argument("--data")
    ap.add_argument("--target-gb", type=float, default=24.0)
    ap.add_argument("--fraction", type=float, default=0.9)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-micro", type=int, default=64)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", help=argparse.SUPPRESS)
    ap.add_argument("--limit-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        work = {
            "ours": lambda: run_ours(args, args.micro_batch, args.steps),
            "hf": lambda: run_hf(args, args.micro_batch, args.steps),
            "hf_worst": lambda: run_hf(args, args.micro_batch, 2, worst_only=True),
            "probe_ours": lambda: probe_ours(args),
            "probe_hf": lambda: probe_hf(args),
        }
        print("RESULT " + json.dumps(work[args.child]()))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            overrides = smoke_overrides(Path(tmp))
            args.steps, args.warmup, args.max_micro = 6, 2, 4
        else:
            overrides = gpu_overrides(args.data, args.arch, Path(tmp))
        args.overrides = json.dumps(overrides)
        rows = [{"stack": name, **_spawn(name, args)} for name in ("ours", "hf")]
        # the memory cap for the fit search: the target card, or (CPU smoke) 1.5 × our peak
        args.limit_bytes = (
            int(1.5 * rows[0]["peak_bytes"])
            if args.smoke
            else int(args.fraction * args.target_gb * GiB)
        )
        fits = {"ours": _spawn("probe_ours", args), "hf": _spawn("probe_hf", args)}
    for row in rows:
        row["peak_gib"] = row.pop("peak_bytes") / GiB
        row["largest_micro_batch"] = fits[row["stack"]]["micro_batch"]
        row["fit_probes"] = fits[row["stack"]]["probes"]
    print(
        table(
            rows,
            [
                "stack",
                "tokens_per_s",
                "samples_per_s",
                "peak_gib",
                "mfu",
                "largest_micro_batch",
                "fit_probes",
            ],
        )
    )
    ours, hf = rows
    ratios = {
        "tokens_per_s_ours_over_hf": ours["tokens_per_s"] / hf["tokens_per_s"],
        "peak_ours_over_hf": ours["peak_gib"] / hf["peak_gib"],
    }
    print(json.dumps(ratios))
    name = "throughput_smoke" if args.smoke else "throughput"
    path = write_result(
        name,
        {
            "micro_batch": args.micro_batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "limit_bytes": args.limit_bytes,
            "rows": rows,
            "ratios": ratios,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
