"""Parameter counts and model-state memory per GPU, computed on the meta device (no weights).

Bytes per parameter follow DeepSpeed's own accounting (its ``estimate_zero2/3_model_states_mem_
needs``), with P all parameters, T the trainable ones, F = P - T frozen, N the GPUs, in mixed
precision (fp16/bf16) with Adam: 16-bit weights 2·P; per trainable parameter 18 bytes = 16-bit
gradient 2 + fp32 gradient partition 4 + fp32 master weight 4 + Adam momentum and variance 8.

| strategy | GPU bytes | CPU bytes (per node) |
|---|---|---|
| zero0 | 2P + 18T | — |
| zero1 | 2P + 2T + 16T/N | — |
| zero2 | 2P + 18T/N | — |
| zero2+offload | 2P | 1.5 · T · max(4·N, 16) |
| zero3 | 4L + (2F + 18T)/N | — |
| zero3+offload (params too) | 4L | 1.5 · 18T + 2F (per node) |

L is the largest layer's parameter count (ZeRO-3 gathers one layer at a time). The 1.5 is
DeepSpeed's buffer factor for host memory. With every parameter trainable the zero2, zero2+offload,
zero3 and zero3+offload rows equal DeepSpeed's estimators (tested). In fp32 (no master copy, no
16-bit gradient): weights 4P, and per trainable parameter 4 (gradient) + 8 (Adam). With QLoRA the
Q frozen LM-trunk linear weights are nf4: 0.5 byte each + their block scales (8-bit per 64 values,
fp32 per 256 of those: 1/64 + 4/16384), so weights cost 2(P - Q) + 0.516·Q; QLoRA runs under
ZeRO-0/1/2 only, so the ZeRO-3 rows are left out. Activations are *not* included: they depend on
batch and sequence length — that is what ``dst-train autotune`` measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dst_train.config import ModelConfig
from dst_train.model.backbone import VLMBackbone, arch_config
from dst_train.model.build import Precision, build_model, group_of, parameter_counts
from dst_train.model.dst_model import HeadConfig

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # a 4-bit value + its share of the block scales


@dataclass
class MemoryRow:
    strategy: str
    gpu_gib: float
    cpu_gib: float


def model_state_memory(
    trainable: int,
    frozen: int,
    gpus: int,
    dtype: str = "fp16",
    largest_layer: int = 0,
    gpus_per_node: int | None = None,
    quantized: int = 0,
) -> list[MemoryRow]:
    """Model-state memory per GPU (and per node's CPU) for each ZeRO strategy (module docstring);
    ``quantized`` of the frozen parameters are nf4 (QLoRA)."""
    n = max(gpus, 1)
    per_node = gpus_per_node or n
    nodes = max(1, n // per_node)
    t, f = trainable, frozen
    p = t + f
    if dtype == "fp32":  # no 16-bit copies: weights 4, gradient 4, Adam 8
        w, g16, rest = 4, 0, 12  # rest = what ZeRO-1 partitions (fp32 grad + Adam)
    else:
        w, g16, rest = 2, 2, 16  # rest = fp32 grad 4 + master 4 + Adam 8
    buf = 1.5  # DeepSpeed's additional_buffer_factor for host memory
    layer = 4 * largest_layer
    weights = w * (p - quantized) + NF4_BYTES * quantized
    rows = [
        ("zero0", weights + (g16 + rest) * t, 0),
        ("zero1", weights + g16 * t + rest * t / n, 0),
        ("zero2", weights + (g16 + rest) * t / n, 0),
        ("zero2+offload", weights, buf * t * max(4 * n, 16)),  # DeepSpeed: all GPUs, not per node
        ("zero3", layer + (w * f + (w + rest) * t) / n, 0),
        ("zero3+offload", layer, buf * (w + rest) * t / nodes + w * f / nodes),
    ]
    if quantized:  # bitsandbytes' 4-bit weights cannot be partitioned by ZeRO-3
        rows = rows[:4]
    return [MemoryRow(name, gpu / GIB, cpu / GIB) for name, gpu, cpu in rows]


def quantized_params(model: torch.nn.Module) -> int:
    """Weights QLoRA stores in 4 bits: the frozen linear layers of the LM trunk (not LoRA's own
    trainable ones, not embeddings, not lm_head, not the vision tower or connector: the
    families' skip lists)."""
    from torch import nn

    lm = _backbone(model).language_model
    linear = [m.weight for m in lm.modules() if isinstance(m, nn.Linear)]
    return sum(w.numel() for w in linear if not w.requires_grad)


def largest_layer_params(model: torch.nn.Module) -> int:
    """Parameters of the largest module counted by its own (direct) parameters: what ZeRO-3
    gathers at once."""
    return max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0
    )


def step_flops(model: torch.nn.Module, tokens: int, frames: int, tokens_per_frame: int) -> float:
    """Model FLOPs of one training step over ``tokens`` sequence positions and ``frames`` frames
    through the vision tower — the 6·N convention (attention and checkpointing recompute left
    out, as in MFU). Per use of a weight: 2 FLOPs forward, 2 for the gradient of its input, 2 for
    its own gradient when it trains. The LM always passes input gradients back (LoRA and the
    connector sit before or inside it), so frozen LM weights count 4; nothing before the vision
    tower trains, so frozen tower weights count 2, once per patch (``patches_per_frame``);
    connector weights act once per frame token. Embedding tables do no matmuls. ZeRO-3's
    partitioned parameters count at full size."""
    patches = frames * _backbone(model).patches_per_frame
    uses = {"vision": (patches, 2), "connector": (frames * tokens_per_frame, 2)}
    total = 0.0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "position_embedding" in name:
            continue
        n = getattr(p, "ds_numel", None) or p.numel()
        count, frozen = uses.get(group_of(name), (tokens, 4))
        total += count * n * (6 if p.requires_grad else frozen)
    return total


def _backbone(model: torch.nn.Module) -> VLMBackbone:
    return next(m for m in model.modules() if isinstance(m, VLMBackbone))


def model_info(mcfg: ModelConfig, gpus: int = 2, dtype: str = "fp16") -> dict:
    """Counts per part, tokens per frame, and the memory table; nothing is allocated."""
    config = arch_config(mcfg.arch)
    # built unquantized on meta (bitsandbytes needs real weights); QLoRA's 4-bit weights are
    # then counted by which layers it quantizes
    meta = ModelConfig(**{**mcfg.__dict__, "pretrained": False, "qlora": False})
    with torch.device("meta"):
        model = build_model(
            meta, HeadConfig(tokens_per_frame=mcfg.tokens_per_frame), Precision("fp32", "sdpa")
        )
    counts = parameter_counts(model)
    trainable = counts["all"]["trainable"]
    frozen = counts["all"]["total"] - trainable
    largest = largest_layer_params(model)
    quantized = quantized_params(model) if mcfg.qlora else 0
    backbone: VLMBackbone = model.backbone
    return {
        "arch": mcfg.arch,
        "parameters": counts,
        "tokens_per_frame": mcfg.tokens_per_frame,
        "native_tokens_per_image": backbone.native_tokens_per_frame,
        "family": config.model_type,
        "lm_hidden": backbone.hidden_size,
        "vocab_size": config.text_config.vocab_size,
        "gpus": gpus,
        "dtype": dtype,
        "largest_layer_params": largest,
        "quantized_params": quantized,
        "memory": [
            row.__dict__
            for row in model_state_memory(
                trainable, frozen, gpus, dtype, largest_layer=largest, quantized=quantized
            )
        ],
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
    if info["quantized_params"]:
        lines += ["", f"QLoRA: {info['quantized_params']:,} LM-trunk weights stored in 4 bits"]
    lines += [
        "",
        f"model states per GPU ({info['gpus']} GPUs, {info['dtype']} + Adam; "
        "activations not included)",
        f"{'strategy':<15} {'GPU GiB':>9} {'CPU GiB':>9}",
    ]
    for row in info["memory"]:
        lines.append(f"{row['strategy']:<15} {row['gpu_gib']:>9.2f} {row['cpu_gib']:>9.2f}")
    return "\n".join(lines)
