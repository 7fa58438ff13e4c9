"""Training throughput and memory: our DeepSpeed loop vs the Hugging Face Trainer driving the same
DeepSpeed config, model and data (the HF Trainer lives in this benchmark only).

    python benchmarks/throughput.py --smoke     # tiny model, CPU, 1 process (for the tests)
    python benchmarks/throughput.py --arch smolvlm2-2.2b --data DATA --target-gb 24 \\
        [--micro-batch 4] [--steps 30]         # GPU: random weights, fp16 + SDPA, 24 GB cap

Each stack runs in its own process, on the same batches in the same order (our length-grouped
sampler's, epoch after epoch; the Trainer is handed them as its batch sampler), counted the
same way over the same steps: ``--steps`` optimizer steps at ``--micro-batch``, the first
``--warmup`` not timed, one clock for both
(``StepClock``: from the first timed step's batch in hand to the last step's end) → tokens/s,
frames/s, samples/s, padding share, the window's share spent waiting for batches (near 1: the
loader set the rate, not the loop), peak memory, model TFLOP/s and MFU
(``dst_train.model.info.step_flops``: the 6·N convention with frozen weights counted as they
are used, ZeRO-3 parameters at full size, over the GPU's dense fp16/bf16 peak; GPU only). Then,
for each stack, the largest micro-batch under the same memory cap: the same search, each probe
in a fresh process (full steps on the worst-case sample until one ran with the optimizer state).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.autotune_bench import gpu_overrides, smoke_overrides  # noqa: E402
from benchmarks.common import environment, read_json_lines, table, write_result  # noqa: E402
from dst_train.engine.trainer import exit_with_result  # noqa: E402
from dst_train.model.info import step_flops  # noqa: E402

GiB = 2**30
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TITAN RTX": 130.0, "L40": 181.0}


def _build(args, micro: int, engine: bool = True):
    from dst_train.config import load_config
    from dst_train.engine.trainer import init_distributed, prepare, setup
    from dst_train.tune.autotune import apply_emulation, emulate_target

    started = time.perf_counter()
    cfg = load_config(args.config, json.loads(args.overrides))
    cfg.train.micro_batch_size, cfg.train.grad_accum = micro, 1
    cfg.train.global_batch_size = 0  # one micro-batch per step, whatever the recipe's global
    cfg.train.max_steps = args.steps
    init_distributed(cfg)
    apply_emulation(cfg, emulate_target(int(args.target_gb * GiB), 0, turing=True))
    s = (setup if engine else prepare)(cfg)
    s["build_s"] = time.perf_counter() - started  # model, data, loaders (and engine) made
    return cfg, s


def _sync() -> None:
    """Wait for queued GPU work, so a clock read is the end of what was launched."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """One clock for both stacks. The window opens when step ``warmup``'s batch is in hand (for
    the Trainer: ``on_step_begin``, which it calls after fetching the step's batch) and closes
    when the last step ends; ``data_wait`` is the time inside it between a step's end and the
    next step's batch in hand (the loader, plus the Trainer's own between-step work)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.t0 = self.t1 = self.last_end = None
        self.data_wait = 0.0

    def batch_ready(self, step: int) -> None:
        now = time.perf_counter()
        if step == self.warmup:
            _sync()
            self.t0 = time.perf_counter()
        elif self.t0 is not None:
            self.data_wait += now - self.last_end

    def step_ended(self) -> None:
        _sync()
        self.t1 = self.last_end = time.perf_counter()

    @property
    def timed(self) -> bool:
        return self.t0 is not None and self.t1 is not None and self.t1 > self.t0

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0 if self.timed else 0.0


def timed_steps(stream, train_step, steps: int, clock: StepClock) -> None:
    """Our loop's side of the clock: fetch a step's batch, then train on it."""
    for i in range(steps):
        batch = next(stream)
        clock.batch_ready(i)
        train_step(batch)
        clock.step_ended()


class BatchCounts:
    """What each trained batch held — the same counting for both stacks, in the training
    process (a Trainer with loader workers collates in them). ``rates`` reads the timed
    batches (``warmup`` onward) over ``seconds``."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, items):  # our loop: collates in the training process
        return self.count(self.collate(items))

    def count(self, batch: dict) -> dict:
        mask = batch["attention_mask"]
        frames = batch.get("pixel_values", batch.get("frame_features"))
        self.batches.append((int(mask.sum()), mask.numel(), frames.shape[0], mask.shape[0]))
        return batch

    def rates(self, first: int, last: int, clock: StepClock, model, k: int) -> dict:
        tokens, positions, frames, samples = (
            sum(c) for c in zip(*self.batches[first:last], strict=True)
        )
        flops = step_flops(model, tokens, frames, k)
        seconds = clock.seconds
        return {
            "batches": [c[:2] for c in self.batches],  # (tokens, positions) of every batch
            "timed_seconds": seconds,
            # the share of the window spent waiting for batches: near 1, the loader, not the
            # training loop, set the rate
            "data_wait_share": clock.data_wait / seconds,
            "timed_tokens": tokens,  # equal for both stacks when they ran the same batches
            "tokens_per_s": tokens / seconds,
            "frames_per_s": frames / seconds,
            "samples_per_s": samples / seconds,
            "padding": 1 - tokens / positions,
            "model_tflops_per_s": flops / seconds / 1e12,
            "mfu": _mfu(flops / seconds),
        }


def _mfu(flops_per_s: float) -> float | None:
    """Model FLOPs per second over the GPU's dense fp16/bf16 peak (GPU only)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).upper()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None if peak is None else flops_per_s / (peak * 1e12)


def _trainable(model) -> int:
    from dst_train.model.build import parameter_counts  # counts ZeRO-3 parameters at full size

    return parameter_counts(model)["all"]["trainable"]


def run_ours(args, micro: int, steps: int) -> dict:
    """Our loop (the trainer's own micro-step runner) for ``steps`` optimizer steps, on the
    batches of the run's length-grouped sampler (epoch 0)."""
    from dst_train.engine.stop_request import StopRequest, host_group
    from dst_train.engine.trainer import MicroBatchRunner, batches_forever
    from dst_train.tune.memory import PeakMemory

    cfg, s = _build(args, micro)
    counts = BatchCounts(s["step_collate"])  # the trainer's
    # with the trainer's stop check before each micro-step (a collective on several ranks)
    stop = StopRequest(s["world"], host_group(s["device"], s["world"]))
    runner = MicroBatchRunner(s["engine"], counts, s["device"], False, micro, 1, 0, stop=stop)
    stream = (batch for _, _, batch in batches_forever(s["loader"], s["sampler"], 0, 0))
    clock = StepClock(args.warmup)
    started = time.perf_counter()
    with PeakMemory(s["device"]) as mem:
        timed_steps(stream, lambda batch: runner.run_window([batch]), steps, clock)
    return {
        "seconds": time.perf_counter() - started,  # every step, warm-up included
        **counts.rates(args.warmup, steps, clock, s["model"], cfg.model.tokens_per_frame),
        "peak_bytes": mem.peak_bytes,
        "trainable": _trainable(s["model"]),
        "build_s": s["build_s"],
    }


class PlannedBatches:
    """The first ``steps`` batches our loop trains, as a batch sampler: epoch 0's batches of our
    length-grouped ``sampler``, then epoch 1's, ... (``batches_forever``'s order). Handed to the
    Trainer as its ``batch_sampler``, it trains exactly these batches in this order: handed a
    flat sample order, it would regroup the samples by ``micro`` (a short batch anywhere but last
    shifts every later one) and, lacking ``set_epoch``, repeat epoch 0's order."""

    def __init__(self, sampler, steps: int):
        self.sampler, self.steps = sampler, steps

    def __iter__(self):
        planned = (b for e in itertools.count() for b in self._epoch(e))
        return itertools.islice(planned, self.steps)

    def _epoch(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        return self.sampler.batches()

    def __len__(self) -> int:
        return self.steps


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
    # Both stacks count batches the same way (BatchCounts) over the same steps (warmup..end) and
    # time them with the same StepClock; the Trainer's batches are counted as they are trained.
    counts = BatchCounts(collate)
    clock = StepClock(args.warmup)

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            clock.batch_ready(state.global_step)

        def on_step_end(self, a, state, control, **kw):
            clock.step_ended()

    plan = None if worst_only else PlannedBatches(s["sampler"], steps)

    class UntilRealStep(TrainerCallback):
        """A fit probe stops as ours does: after 2 steps, once a step ran with the optimizer
        state (fp16 skips the first steps and DeepSpeed creates Adam's state at the first real
        one — two skipped steps would miss 12 bytes per trainable parameter)."""

        real_before = 0

        def on_step_end(self, a, state, control, **kw):
            real = state.global_step - trainer.model_wrapped.skipped_steps
            if state.global_step >= 2 and self.real_before > 0:
                control.should_training_stop = True
            self.real_before = real

    class SameOrderTrainer(Trainer):
        """The Trainer fed our loop's batches in our order (its own sampler would shuffle at
        random and pad more: the two loops would do different work); its loader is built as its
        own ``_get_dataloader`` builds one, but with our batches."""

        def get_train_dataloader(self):
            if plan is None:
                return super().get_train_dataloader()
            a = self.args
            loader = torch.utils.data.DataLoader(
                self.train_dataset,
                batch_sampler=plan,
                collate_fn=self.data_collator,
                num_workers=a.dataloader_num_workers,
                pin_memory=a.dataloader_pin_memory,
                prefetch_factor=a.dataloader_prefetch_factor,
            )
            return self.accelerator.prepare(loader)

        def training_step(self, model, inputs, *a, **kw):
            counts.count(inputs)
            return super().training_step(model, inputs, *a, **kw)

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
        dataloader_num_workers=cfg.data.num_workers,  # as our loader's
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = SameOrderTrainer(
        model=model,
        args=hf_args,
        train_dataset=dataset,
        data_collator=collate,
        callbacks=[Timer(), *([UntilRealStep()] if worst_only else [])],
    )
    oom = False
    started = time.perf_counter()
    with PeakMemory(trainer.args.device) as mem:
        try:
            trainer.train()
        except torch.OutOfMemoryError:
            oom = True
    timed = clock.timed and len(counts.batches) > args.warmup  # a fit probe times nothing
    k = cfg.model.tokens_per_frame
    rates = counts.rates(args.warmup, steps, clock, model, k) if timed else {}
    return {
        "seconds": time.perf_counter() - started,  # the whole train() call, warm-up included
        **rates,
        "peak_bytes": mem.peak_bytes,
        "oom": oom,
        "trainable": _trainable(model),
        "build_s": s["build_s"],  # the Trainer builds its engine inside train(): in "seconds"
    }


def probe_ours_once(args, micro: int) -> dict:
    """One probe of our loop at ``micro`` (the autotuner's probe: full steps on the worst-case
    sample until one ran with the optimizer state), in this fresh process."""
    from dataclasses import asdict

    from dst_train.tune.autotune import Prober, sample_cost, worst_case_index

    cfg, s = _build(args, 1)
    ds = s["train_ds"]
    prober = Prober(
        s["engine"],
        ds[worst_case_index(ds, sample_cost(cfg, s))],
        s["step_collate"],  # the trainer's
        s["device"],
    )
    return {**asdict(prober(micro)), "build_s": s["build_s"]}


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
        *(["--config", args.config] if args.config else []),
    ]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    if proc.returncode != 0:
        raise RuntimeError(f"{role} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    # the child's whole life: imports and exit on top of its build_s and seconds
    return {**json.loads(line[len("RESULT ") :]), "process_s": time.perf_counter() - started}


class ProbeLog:
    """The fit searches' probes, one JSON line each, appended as each probe ends: a search cut
    short (a lease's deadline) keeps what it measured, and a rerun over the same file measures
    only the probes it lacks. ``setting``: what a probe's peak depends on besides the stack and
    the micro-batch (model, data, recipe, cap); probes of another setting are not reused."""

    def __init__(self, path: Path | None, setting: dict):
        self.path, self.setting = path, setting
        self.taken = []  # the probes the searches took, measured or reused, in order

    def probes(self) -> list[dict]:
        """This setting's probes in the file, in the order they ran."""
        rows = read_json_lines(self.path) if self.path is not None else []
        return [r for r in rows if r.get("setting") == self.setting]

    def measure(self, role: str, micro: int, spawn) -> dict:
        """The probe of ``role`` at ``micro``: from the file, else ``spawn(micro)``, recorded."""
        for r in self.probes():
            if (r["role"], r["micro"]) == (role, micro):
                self.taken.append({**r, "reused": True})
                return self.taken[-1]
        r = {"role": role, "micro": micro, **spawn(micro), "setting": self.setting}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # a line a kill cut short is ended first, so this one starts a line of its own
            before = self.path.read_bytes() if self.path.exists() else b""
            torn = before and not before.endswith(b"\n")
            with self.path.open("a") as f:
                f.write(("\n" if torn else "") + json.dumps(r) + "\n")
        self.taken.append(r)
        return r


# what a fit probe keeps: its peak, and where its process's time went (the probe's steps,
# the build before them, imports and exit around both) and how many steps fp16 skipped
PROBE_KEYS = ("peak_bytes", "oom", "seconds", "build_s", "process_s", "steps", "real_steps")


def largest_fit(args, role: str, log: ProbeLog) -> dict:
    """Largest micro-batch of one stack under the cap: the same search for both, every probe in
    a fresh process (a fresh engine and allocator; the Trainer cannot be rebuilt in place) —
    the autotuner's from micro-batch 1, or with ``--fit-from N`` a bracket around N (two
    probes a stack when N is the answer: a GPU lease's minutes). Probes go through ``log``."""
    from dst_train.tune.search import Probe, search, search_from

    def spawn(micro: int) -> dict:
        r = _spawn(role, args, micro=micro)
        return {k: r[k] for k in PROBE_KEYS if k in r}

    def measure(b: int) -> Probe:
        r = log.measure(role, b, spawn)
        return Probe(b, r["peak_bytes"], r["seconds"], oom=r["oom"])

    if args.fit_from:
        r = search_from(measure, args.limit_bytes, args.fit_from, max_micro=args.max_micro)
    else:
        r = search(measure, args.limit_bytes, max_micro=args.max_micro)
    return {"micro_batch": r.micro_batch, "probes": len(r.probes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--arch", default="smolvlm2-2.2b", help="architecture name or model folder")
    ap.add_argument("--data")
    ap.add_argument("--config", help="run config YAML under the overrides (e.g. a recipe)")
    ap.add_argument("--name", help="result file name (default throughput[_smoke])")
    ap.add_argument("--no-fit", action="store_true", help="skip the largest-micro-batch searches")
    ap.add_argument(
        "--fit-only",
        action="store_true",
        help="only the largest-micro-batch searches (a stage of its own in a short GPU lease)",
    )
    ap.add_argument(
        "--fit-from",
        type=int,
        default=0,
        help="start both largest-micro-batch searches at this size (e.g. the autotuner's)",
    )
    ap.add_argument(
        "--fit-probes",
        type=Path,
        help="JSON-lines log of the fit probes: each appended as it ends, reused by a rerun",
    )
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
            "hf_worst": lambda: run_hf(args, args.micro_batch, 24, worst_only=True),
            "ours_probe": lambda: probe_ours_once(args, args.micro_batch),
        }
        exit_with_result(work[args.child]())
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            overrides = smoke_overrides(Path(tmp), videos=12)
            args.steps, args.warmup, args.max_micro = 6, 2, 4
        else:
            overrides = gpu_overrides(args.data, args.arch, Path(tmp))
        args.overrides = json.dumps(overrides)
        stacks = () if args.fit_only else ("ours", "hf")
        rows = [{"stack": name, **_spawn(name, args)} for name in stacks]
        args.limit_bytes = fit_limit(args, rows)
        fits, log = {}, ProbeLog(args.fit_probes, _setting(args))
        if not args.no_fit:
            fits = {
                "ours": largest_fit(args, "ours_probe", log),
                "hf": largest_fit(args, "hf_worst", log),
            }
    name = args.name or ("throughput_smoke" if args.smoke else "throughput")
    result = {"micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup}
    result.update(limit_bytes=args.limit_bytes, fits=fits, probes=log.taken)
    result.update(rates_table(rows, fits) if rows else {"rows": [], "ratios": {}})
    if fits:
        ratio = fits["ours"]["micro_batch"] / max(fits["hf"]["micro_batch"], 1)
        result["ratios"]["largest_micro_batch_ours_over_hf"] = ratio
        print(json.dumps({"fits": fits, "ratios": result["ratios"]}))
    print(f"wrote {write_result(name, result, args.out)}")


def _setting(args) -> dict:
    """What a fit probe's peak depends on besides the stack and the micro-batch (the code
    itself aside: a probe log is for going on with one run, not a cache across changes)."""
    env = environment()
    return {
        "arch": args.arch,
        "data": args.data,
        "config": args.config,
        "limit": args.limit_bytes,
        "gpu": env["device"].get("gpu"),
        "versions": env["versions"],
    }


def fit_limit(args, rows: list[dict]) -> int:
    """The memory cap of the fit search: the target card's fraction, or (CPU smoke) 1.5 × our
    loop's peak (from its row, else from a run of it)."""
    if not args.smoke:
        return int(args.fraction * args.target_gb * GiB)
    peak = rows[0]["peak_bytes"] if rows else _spawn("ours", args)["peak_bytes"]
    return int(1.5 * peak)


def rates_table(rows: list[dict], fits: dict) -> dict:
    """Print both stacks' rates; their rows and ratios."""
    for row in rows:
        row["peak_gib"] = row.pop("peak_bytes") / GiB
        row["largest_micro_batch"] = fits.get(row["stack"], {}).get("micro_batch")
        row["fit_probes"] = fits.get(row["stack"], {}).get("probes")
    print(
        table(
            rows,
            [
                "stack",
                "tokens_per_s",
                "frames_per_s",
                "samples_per_s",
                "padding",
                "data_wait_share",
                "model_tflops_per_s",
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
    return {"rows": rows, "ratios": ratios}


if __name__ == "__main__":
    main()
