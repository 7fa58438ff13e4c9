"""Which dtype and attention kernel a device gets.

Turing cards (Titan RTX, compute capability 7.5) have no bf16 and no FlashAttention-2: they must get
fp16 + SDPA. Ampere and later (>= 8.0) get bf16, and FlashAttention-2 when it is installed. The CPU
gets bf16 (DeepSpeed refuses fp16 on CPU) or fp32.
"""

from __future__ import annotations

import importlib.util

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_precision(
    capability: tuple[int, int] | None,
    dtype: str = "auto",
    attention: str = "auto",
    flash_installed: bool | None = None,
    cpu_dtype: str = "fp32",
) -> tuple[str, str]:
    """Resolve ``(dtype, attn_implementation)`` for a device.

    ``capability`` is the CUDA compute capability, or None for the CPU. An explicit ``dtype`` or
    ``attention`` that the device cannot run raises ``ValueError`` instead of failing later.
    """
    flash = flash_attn_installed() if flash_installed is None else flash_installed
    if dtype == "auto":
        if capability is None:
            dtype = cpu_dtype
        else:
            dtype = "bf16" if capability >= (8, 0) else "fp16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto|fp16|bf16|fp32, got {dtype!r}")
    if capability is not None and capability < (8, 0) and dtype == "bf16":
        raise ValueError(
            f"bf16 needs compute capability >= 8.0; this GPU is "
            f"{capability[0]}.{capability[1]}: use fp16"
        )
    if capability is None and dtype == "fp16":
        raise ValueError("fp16 is not supported on CPU by DeepSpeed: use bf16 or fp32")
    if attention == "auto":
        ok_flash = capability is not None and capability >= (8, 0) and flash
        attention = "flash_attention_2" if ok_flash and dtype != "fp32" else "sdpa"
    if attention == "flash_attention_2" and (
        capability is None or capability < (8, 0) or not flash
    ):
        raise ValueError(
            "flash_attention_2 needs a GPU of compute capability >= 8.0 and the "
            "flash-attn package; use sdpa"
        )
    if attention not in ("sdpa", "eager", "flash_attention_2"):
        raise ValueError(f"attention must be auto|sdpa|eager|flash_attention_2, got {attention!r}")
    return dtype, attention


def device_capability() -> tuple[int, int] | None:
    """Compute capability of the current CUDA device, or None without one."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()
    return None
