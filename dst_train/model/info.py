"""Parameter counts and model-state memory per GPU, computed on the meta device (no weights).

Model states per parameter with mixed precision (fp16/bf16) and Adam: 2 bytes of weights, 2 of
gradients, and 12 of optimizer state (fp32 master copy, momentum, variance); in fp32, 4 + 4 + 8.
Frozen parameters hold weights only. ZeRO partitions them across N data-parallel GPUs:

| stage | weights | gradients | optimizer |
|---|---|---|---|
| 0 | full | full | full |
| 1 | full | full | 1/N |
| 2 | full | 1/N | 1/N |
| 3 | 1/N | 1/N | 1/N |

Optimizer offload moves the optimizer states (and the fp32 gradient copy) to CPU RAM; parameter
offload (stage 3) moves the weights too. Activations are *not* included: they depend on batch and
sequence length — that is what ``dst-train autotune`` measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dst_train.config import ModelConfig
from dst_train.model.backbone import SmolVLMBackbone, arch_config, check_tokens_per_frame
from dst_train.model.build import Precision, build_model, parameter_counts
from dst_train.model.dst_model import HeadConfig

GIB = 2**30


@dataclass
class MemoryRow:
    strategy: str
    gpu_gib: float
    cpu_gib: float


def model_state_memory(
    trainable: int, frozen: int, gpus: int, dtype: str = "fp16"
) -> list[MemoryRow]:
    """Model-state memory per GPU (and per node's CPU) for each ZeRO strategy."""
    w = 4 if dtype == "fp32" else 2
    opt = 8 if dtype == "fp32" else 12
    n = max(gpus, 1)
    weights, grads, optim = w * (trainable + frozen), w * trainable, opt * trainable
    rows = [
        ("zero0", weights + grads + optim, 0),
        ("zero1", weights + grads + optim / n, 0),
        ("zero2", weights + grads / n + optim / n, 0),
        ("zero2+offload", weights + grads / n, optim + 4 * trainable),
        ("zero3", (weights + grads + optim) / n, 0),
        ("zero3+offload", grads / n, optim + 4 * trainable + weights),
    ]
    return [MemoryRow(name, gpu / GIB, cpu / GIB) for name, gpu, cpu in rows]


def model_info(mcfg: ModelConfig, gpus: int = 2, dtype: str = "fp16") -> dict:
    """Counts per part, tokens per frame, and the memory table; nothing is allocated."""
    config = arch_config(mcfg.arch)
    grid = config.vision_config.image_size // config.vision_config.patch_size
    check_tokens_per_frame(mcfg.tokens_per_frame, grid, config.scale_factor)
    meta = ModelConfig(**{**mcfg.__dict__, "pretrained": False, "qlora": False})
    with torch.device("meta"):
        model = build_model(
            meta, HeadConfig(tokens_per_frame=mcfg.tokens_per_frame), Precision("fp32", "sdpa")
        )
    counts = parameter_counts(model)
    trainable = counts["all"]["trainable"]
    frozen = counts["all"]["total"] - trainable
    backbone: SmolVLMBackbone = model.backbone
    return {
        "arch": mcfg.arch,
        "parameters": counts,
        "tokens_per_frame": mcfg.tokens_per_frame,
        "native_tokens_per_image": (grid // config.scale_factor) ** 2,
        "lm_hidden": backbone.hidden_size,
        "vocab_size": config.text_config.vocab_size,
        "gpus": gpus,
        "dtype": dtype,
        "memory": [row.__dict__ for row in model_state_memory(trainable, frozen, gpus, dtype)],
    }


def format_info(info: dict) -> str:
    lines = [
        f"arch {info['arch']}: LM hidden {info['lm_hidden']}, vocab {info['vocab_size']}, "
        f"{info['tokens_per_frame']} tokens/frame (native {info['native_tokens_per_image']} "
        "per image)",
        "",
        f"{'part':<10} {'total':>15} {'trainable':>15}",
    ]
    for group, c in info["parameters"].items():
        if c["total"] or group == "all":
            lines.append(f"{group:<10} {c['total']:>15,} {c['trainable']:>15,}")
    lines += [
        "",
        f"model states per GPU ({info['gpus']} GPUs, {info['dtype']} + Adam; "
        "activations not included)",
        f"{'strategy':<15} {'GPU GiB':>9} {'CPU GiB':>9}",
    ]
    for row in info["memory"]:
        lines.append(f"{row['strategy']:<15} {row['gpu_gib']:>9.2f} {row['cpu_gib']:>9.2f}")
    return "\n".join(lines)
