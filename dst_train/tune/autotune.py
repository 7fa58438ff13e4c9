"""``dst-train autotune``: the largest micro-batch whose training steps peak at ≤ fraction × target.

One process per GPU (launch it like training). Every rank builds the real DeepSpeed engine once
(micro-batch 1, no accumulation) and probes micro-batch sizes on the *worst-case* sample of the
train split (highest estimated bytes: tokens, frames, labelled positions — see
:mod:`~dst_train.tune.worst_case`; close candidates are measured) repeated ``b`` times:
each probe runs full steps (forward, backward, ``optimizer.step()``; two of them, so the
optimizer state exists), reads the peak (:class:`~dst_train.tune.memory.PeakMemory`), and the
ranks agree on the maximum.
:func:`~dst_train.tune.search.search` picks the sizes. The engine is reused across probes, which
is what makes this cheaper than relaunching a job per candidate.

On a GPU bigger than the target, the target card is emulated: PyTorch's allocator is capped at
what the target leaves it (its total memory less the CUDA context); ``turing=True`` also forces
fp16 + SDPA (a Turing card's kernels). Results are cached by everything that changes the answer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from dst_train.atomic_io import write_text_atomic
from dst_train.config import RunConfig, to_dict
from dst_train.tune.memory import nvml_process_bytes, outside_allocator
from dst_train.tune.search import NothingFits, Probe, SearchResult, accumulation_for, search
from dst_train.tune.worst_case import SampleCost, labelled_positions, worst_case_candidates

GiB = 2**30


def sample_cost(cfg: RunConfig, s: dict) -> SampleCost:
    """The byte estimate that ranks samples, for the run ``s`` (trainer.setup's pieces)."""
    return SampleCost.for_run(cfg, s["model"].backbone.shape(), s["processor"].image_size)


def worst_case_index(dataset, cost: SampleCost) -> int:
    """The sample with the highest estimated cost (tokens, frames, labelled positions)."""
    return worst_case_candidates(dataset, cost, margin=0.0)[0][0]


def choose_worst_case(dataset, cost: SampleCost, prober) -> dict:
    """The sample to probe: the costliest by estimate, or — when several are within 5 % of it —
    the one whose micro-batch-1 probe peaks highest (measured, not estimated)."""
    candidates = worst_case_candidates(dataset, cost)
    measured = {}
    if len(candidates) > 1:
        for i, _ in candidates:
            prober.sample = dataset[i]
            measured[i] = prober(1).peak_bytes
    index = max(measured, key=measured.get) if measured else candidates[0][0]
    prober.sample = dataset[index]
    return {
        "index": index,
        "tokens": dataset.lengths()[index],
        "frames": dataset.num_frames(index),
        "labelled": labelled_positions(dataset.samples[index]),
        "estimated_bytes": dict(candidates)[index],
        "candidates": [
            {"index": i, "estimated_bytes": c, "measured_peak_bytes": measured.get(i)}
            for i, c in candidates
        ],
    }


class Prober:
    """``prober(b)`` → :class:`Probe` for micro-batch ``b`` (max over ranks).

    A probe measures a state equal to steady training: it starts from released memory (the
    previous probe's tensors dropped, the allocator's cache emptied, the peak reset — see
    :class:`~dst_train.tune.memory.PeakMemory`) and runs full steps until at least ``steps``
    have run *and* the last one ran with the optimizer state present (after a real step). With
    fp16, DeepSpeed skips steps whose gradients overflow (the first ones, at loss scale 2^16) and
    creates the Adam state only at the first real step: a probe of skipped steps misses 12 bytes
    per trainable parameter.

    ``stop_at`` (a ``clock()`` reading, by default ``time.time()``: seconds since the epoch, so
    another process can set it) ends a long probe — the GPU bench's check after tuning — after
    the step during which it passed; ``Probe.steps`` says how many ran."""

    def __init__(
        self, engine, sample, collate, device, steps: int = 2, max_steps: int = 24, cuda=None
    ):
        self.engine, self.sample, self.collate = engine, sample, collate
        self.device, self.steps, self.max_steps, self.cuda = device, steps, max_steps, cuda
        self.stop_at: float | None = None
        self.clock = time.time

    def __call__(self, b: int) -> Probe:
        from dst_train.engine.trainer import to_device
        from dst_train.tune.memory import PeakMemory

        batch = to_device(self.collate([self.sample] * b), self.device)
        oom = False
        t0 = time.perf_counter()
        real_steps = steps = 0
        with PeakMemory(self.device, cuda=self.cuda) as mem:
            try:
                for n in range(1, max(self.steps, self.max_steps) + 1):
                    state_existed = real_steps > 0  # this step's forward/backward ran with it
                    skipped = self.engine.skipped_steps
                    out = self.engine(**batch)
                    self.engine.backward(out["loss"])
                    self.engine.step()
                    del out
                    steps += 1
                    real_steps += self.engine.skipped_steps == skipped
                    late = self._past_deadline()  # on every rank every step: a collective
                    if late or n >= self.steps and state_existed:
                        break
            except torch.OutOfMemoryError:
                oom = True
        del batch
        if oom:
            self.engine.zero_grad()
        # float64: bytes up to 2^53 exactly (float32 rounds a 20 GB peak to the nearest KiB)
        agreed = torch.tensor([mem.peak_bytes, int(oom)], dtype=torch.float64, device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        seconds = time.perf_counter() - t0
        return Probe(
            b, int(agreed[0]), seconds, oom=bool(agreed[1]), real_steps=real_steps, steps=steps
        )

    def _past_deadline(self) -> bool:
        """``stop_at`` has passed — on any rank, so that all stop after the same step."""
        if self.stop_at is None:
            return False
        past = torch.tensor([float(self.clock() >= self.stop_at)], device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(past, op=torch.distributed.ReduceOp.MAX)
        return bool(past.item())


def cache_key(
    cfg: RunConfig,
    target_gb: float,
    fraction: float,
    world: int,
    global_batch: int = 0,
    emulated: dict | None = None,
) -> str:
    """Everything the answer depends on: model and loss options (precision, checkpointing,
    tokens per frame, LoRA, ...), every data option (sequence length, frames per sample, feature
    cache, ...), the DeepSpeed template (ZeRO stage, offload), device, ranks, target, fraction,
    the global batch (it decides the accumulation written to tuned.yaml), whether a Turing card
    is emulated (fp16 + SDPA), library versions and dst-train's own code
    (:func:`source_digest`)."""
    import deepspeed
    import transformers

    from dst_train.engine.ds_config import resolve_template_path

    device = "cpu"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        device = f"{p.name}/{p.total_memory}"
    parts = {
        "model": asdict(cfg.model),
        "loss": asdict(cfg.loss),
        "data": asdict(cfg.data),  # sequence length, frames per sample, feature cache, ...
        "ds": resolve_template_path(cfg.train.ds_config).read_text(),
        "device": device,
        "world": world,
        "target": target_gb,
        "fraction": fraction,
        "global_batch": global_batch,
        "turing": bool(emulated and "dtype" in emulated),
        "versions": [torch.__version__, deepspeed.__version__, transformers.__version__],
        "dst_train": source_digest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


PACKAGE_DIR = Path(__file__).resolve().parents[1]


def source_digest(root: Path = PACKAGE_DIR) -> str:
    """sha256 over the Python sources under ``root`` (this package): an answer cached before
    any change to the code that builds and runs the step is not reused. The package version
    does not say it — moving frames in 8 bits changed every probe's peak, not 0.1.0."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def measure_context(local_rank: int, cuda=torch.cuda) -> tuple[int, str]:
    """(bytes this process holds on the GPU outside the allocator, "nvml" | "default")."""
    cuda.init()
    nvml = nvml_process_bytes(local_rank) if cuda is torch.cuda else None
    return outside_allocator(nvml, cuda.memory_reserved(local_rank))


def emulate_target(
    target_bytes: int, local_rank: int, turing: bool = False, cuda=torch.cuda, context=None
) -> dict | None:
    """Make this GPU behave like a ``target_bytes`` card (its total memory). The allocator may
    take what such a card leaves after the CUDA context: ``target − context`` (the context is
    measured here by NVML, else :data:`DEFAULT_CONTEXT_BYTES`; ``context`` = (bytes, source)
    overrides). Capped only when this GPU is bigger. ``turing``: the target runs fp16 + SDPA
    (no bf16, no FlashAttention-2) — :func:`apply_emulation` forces them on the probe config —
    and SDPA's kernels are those sm75 has: PyTorch's FlashAttention and cuDNN attention are
    switched off for this process (on Turing SDPA runs the memory-efficient kernel, whose buffers
    differ). Like the allocator cap, this is for a process that only probes.
    Returns what was done (None on CPU). ``cuda``: the memory API (tests pass a double)."""
    if not cuda.is_available():
        return None
    total = cuda.get_device_properties(local_rank).total_memory
    context_bytes, source = context or measure_context(local_rank, cuda)
    done = {"device_bytes": total, "context_bytes": context_bytes, "context_source": source}
    if total > target_bytes:
        share = (target_bytes - context_bytes) / total
        cuda.set_per_process_memory_fraction(share, local_rank)
        done["allocator_share"] = share
    if turing:
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
        done.update(dtype="fp16", attention="sdpa", sdpa_backends=["mem_efficient", "math"])
    return done


def apply_emulation(cfg: RunConfig, emulated: dict | None) -> None:
    """The emulated card's kernels on ``cfg`` (a probe's config; never the tuned one)."""
    if emulated and "dtype" in emulated:
        cfg.model.dtype, cfg.model.attention = emulated["dtype"], emulated["attention"]


def refusal(cfg: RunConfig, world: int, limit: int, result: SearchResult) -> str:
    """What does not fit, the model-state memory of every ZeRO strategy, and what to change."""
    from dst_train.model.info import model_info

    info = model_info(cfg.model, gpus=world)
    rows = "\n".join(
        f"  {r['strategy']:<16} {r['gpu_gib']:8.2f} GiB/GPU  {r['cpu_gib']:8.2f} GiB CPU"
        for r in info["memory"]
    )
    p = result.probes[0]
    need = "out of memory" if p.oom else f"{p.peak_bytes / GiB:.2f} GiB"
    return (
        f"micro-batch 1 does not fit: {need} > limit {limit / GiB:.2f} GiB per GPU.\n"
        f"Model states alone per GPU ({world} GPUs, fp16 + Adam, no activations):\n{rows}\n"
        "Try: a ZeRO stage with a smaller number above (train.ds_config=ds_configs/zero3.json "
        "or the *_offload.json ones), model.gradient_checkpointing=true, "
        "model.freeze_vision=true with data.feature_cache, model.lora=true, or a smaller "
        "data.max_seq_len."
    )


def autotune(
    cfg: RunConfig,
    target_gb: float = 24.0,
    fraction: float = 0.9,
    out: str | Path | None = None,
    max_micro: int = 256,
    use_cache: bool = True,
    cache_dir: str | Path | None = None,
    global_batch: int = 0,
    turing: bool = False,
) -> dict:
    """Run the search (``turing``: probe with a Turing card's fp16 + SDPA); rank 0 writes
    ``OUT/{autotune.json, autotune.md, tuned.yaml, ds_config.json}`` (the last two when
    something fits). Returns the report (every rank)."""
    import os

    from dst_train.engine.trainer import init_distributed, setup

    t0 = time.perf_counter()
    target = int(target_gb * GiB)
    limit = int(fraction * target)
    out = Path(out or Path(cfg.output_dir) / "autotune")
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "dst-train" / "autotune")
    rank, world, device = init_distributed(cfg)
    emulated = emulate_target(target, int(os.environ.get("LOCAL_RANK", 0)), turing)
    global_batch = (
        global_batch
        or cfg.train.global_batch_size
        or (cfg.train.micro_batch_size * cfg.grad_accum(world) * world)
    )
    key = cache_key(cfg, target_gb, fraction, world, global_batch, emulated)
    cached = cache_dir / f"{key}.json"
    report = read_cached(cached) if use_cache else None
    if report is not None:
        report["from_cache"] = str(cached)
        _write(report, cfg, out, rank)
        return report
    probe_cfg = copy.deepcopy(cfg)
    apply_emulation(probe_cfg, emulated)
    probe_cfg.train.micro_batch_size, probe_cfg.train.grad_accum = 1, 1
    probe_cfg.train.global_batch_size = 0
    s = setup(probe_cfg)
    ds = s["train_ds"]
    prober = Prober(s["engine"], None, s["step_collate"], device)
    worst = choose_worst_case(ds, sample_cost(cfg, s), prober)
    report = {
        "target_gb": target_gb,
        "fraction": fraction,
        "limit_bytes": limit,
        "world": world,
        "device": _device_name(device),
        "emulated": emulated,
        "cache_key": key,
        "worst_case": worst,
        "global_batch": global_batch,
    }
    try:
        result = search(prober, limit, max_micro=max_micro)
    except NothingFits as err:
        report.update(
            error=refusal(cfg, world, limit, err.result),
            probes=[asdict(p) for p in err.result.probes],
        )
        _write(report, cfg, out, rank)
        raise SystemExit(report["error"]) from None
    micro, accum = accumulation_for(global_batch, result.micro_batch, world)
    report.update(
        result.to_dict(),
        micro_batch=micro,
        searched_micro_batch=result.micro_batch,
        grad_accum=accum,
        seconds=time.perf_counter() - t0,
    )
    report["probes"] = [asdict(p) for p in result.probes]
    _write(report, cfg, out, rank)
    if rank == 0 and use_cache:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cached, json.dumps(report, indent=2))
    return report


def read_cached(path: Path) -> dict | None:
    """A cached report, or None when there is none or it cannot be read (a file cut short by a
    crash before writes were atomic, or edited by hand: measured again, and rewritten)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        print(f"{path}: unreadable autotune cache entry ({err}); measuring again", flush=True)
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def tuned_config(cfg: RunConfig, report: dict) -> RunConfig:
    """The run config at the tuned sizes. Precision stays the run's own (``auto`` resolves on
    the target itself) unless a Turing card was emulated: then fp16 + SDPA, all it runs."""
    tuned = copy.deepcopy(cfg)
    apply_emulation(tuned, report.get("emulated"))
    tuned.train.micro_batch_size = report["micro_batch"]
    tuned.train.grad_accum = report["grad_accum"]
    tuned.train.global_batch_size = report["global_batch"]
    return tuned


def tuned_ds_config(tuned: RunConfig, report: dict) -> dict:
    """The DeepSpeed config a run with the tuned config will resolve (for reading, not input)."""
    from dst_train.engine.trainer import run_ds_config
    from dst_train.model.build import resolve_precision

    dtype = resolve_precision(tuned.model).dtype
    return run_ds_config(tuned, report["world"], dtype, torch.cuda.is_available())


def table(report: dict) -> str:
    lines = [
        "| micro-batch | predicted GiB | measured GiB | fits | seconds |",
        "|---:|---:|---:|:---:|---:|",
    ]
    for p in report.get("probes", []):
        pred = "" if p.get("predicted_bytes") is None else f"{p['predicted_bytes'] / GiB:.2f}"
        meas = "OOM" if p["oom"] else f"{p['peak_bytes'] / GiB:.2f}"
        fits = "yes" if not p["oom"] and p["peak_bytes"] <= report["limit_bytes"] else "no"
        lines.append(f"| {p['micro_batch']} | {pred} | {meas} | {fits} | {p['seconds']:.1f} |")
    if "micro_batch" in report:
        lines.append("")
        lines.append(
            f"largest micro-batch that fits: {report['searched_micro_batch']} (peak "
            f"{report['peak_bytes'] / GiB:.2f} GiB of limit {report['limit_bytes'] / GiB:.2f} GiB"
            f" = {report['fraction']:.0%} of {report['target_gb']} GB); "
            f"{len(report['probes'])} probes, {report.get('seconds', 0):.0f} s"
        )
        lines.append(
            f"tuned: micro-batch {report['micro_batch']} × {report['world']} GPUs × accumulation "
            f"{report['grad_accum']} = global batch {report['global_batch']} (kept)"
        )
    return "\n".join(lines)


def _write(report: dict, cfg: RunConfig, out: Path, rank: int) -> None:
    if rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "autotune.json").write_text(json.dumps(report, indent=2))
    (out / "autotune.md").write_text(f"# Autotune ({report['device']})\n\n{table(report)}\n")
    if "micro_batch" in report:
        tuned = tuned_config(cfg, report)
        (out / "tuned.yaml").write_text(
            f"# written by dst-train autotune (cache key {report['cache_key']})\n"
            + yaml.safe_dump(to_dict(tuned), sort_keys=False)
        )
        (out / "ds_config.json").write_text(json.dumps(tuned_ds_config(tuned, report), indent=2))
