"""DeepSpeed config: a template from ``ds_configs/`` with every ``"auto"`` filled from the run.

Filled values: micro-batch, accumulation, global batch, clipping, lr/betas/weight decay,
fp16/bf16 from the resolved precision, ``torch_adam`` (True unless ``deepspeed_adam``: torch's
AdamW needs no compiled op; DeepSpeed's FusedAdam/CPUAdam compile on first use and need a CUDA
toolkit) and bucket sizes from the LM hidden size H (reduce/all-gather bucket
H², stage-3 prefetch 0.9·H², persistence threshold 10·H — the rules transformers uses).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# set by the run (its micro-batch, accumulation and GPU count); a template may only say "auto"
# or the same number
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def resolve_template_path(path: str) -> Path:
    """A ds config path as given, or relative to the repository (``ds_configs/zero2.json``)."""
    p = Path(path)
    if not p.is_file() and (PACKAGE_ROOT / path).is_file():
        p = PACKAGE_ROOT / path
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path!r} not found")
    return p


def build_ds_config(
    template: dict | str,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    grad_clip: float,
    dtype: str,
    hidden_size: int,
    on_gpu: bool,
    deepspeed_adam: bool = False,
) -> dict:
    name = "the DeepSpeed config"
    if isinstance(template, str):
        path = resolve_template_path(template)
        name, template = str(path), json.loads(path.read_text())
    cfg = copy.deepcopy(template)
    fill = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_force_ds_cpu_optimizer": on_gpu and deepspeed_adam,
    }
    for key, value in fill.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
        elif key in BATCH_KEYS and cfg[key] != value:
            # DeepSpeed would count and scale by its number while the loader feeds the run's
            raise ValueError(
                f"{name} sets {key} = {cfg[key]!r}, but this run's is {value} (from "
                "train.micro_batch_size or the tuned config, the accumulation and the GPU "
                'count): write "auto" there; the run config decides the batch'
            )
    cfg.setdefault("fp16", {})
    cfg.setdefault("bf16", {})
    cfg["fp16"]["enabled"] = dtype == "fp16"
    cfg["bf16"]["enabled"] = dtype == "bf16"
    params = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    for key, value in (
        ("lr", lr),
        ("betas", list(betas)),
        ("weight_decay", weight_decay),
        ("torch_adam", not (on_gpu and deepspeed_adam)),
    ):
        if params.get(key, "auto") == "auto":
            params[key] = value
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    h2 = hidden_size * hidden_size
    for key, value in (
        ("reduce_bucket_size", h2),
        ("allgather_bucket_size", h2),
        ("stage3_prefetch_bucket_size", int(0.9 * h2)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise ValueError(f"DeepSpeed config still has unresolved 'auto' values: {leftover}")
    return cfg


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
