"""ZeRO-2/3 checkpoint → a Hugging Face model folder (``dst-train convert``).

DeepSpeed's ``zero_to_fp32`` consolidates the rank shards into one fp32 state dict on the CPU (no
process group needed). The model is rebuilt from the checkpoint's own ``config.yaml`` (random
init, no weights downloaded), the state dict loaded strictly, LoRA merged (or kept as an
adapter), and the result saved: the backbone as a plain transformers folder (safetensors,
config, tokenizer, image processor) + ``dst_heads.safetensors`` + ``dst_config.json``.
"""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

from dst_train.engine import checkpoint
from dst_train.model.precision import DTYPES


def locate(path: str | Path) -> tuple[Path, str]:
    """(checkpoints folder, tag) from a run dir, a checkpoints dir, or a step folder."""
    p = Path(path)
    for ckpt_dir in (p / "checkpoints", p):
        tag = checkpoint.latest_tag(ckpt_dir)
        if tag:
            return ckpt_dir, tag
    if (p / checkpoint.COMPLETE).is_file():
        return p.parent, p.name
    raise FileNotFoundError(
        f"{p}: no complete checkpoint (expected a run dir, its checkpoints/ "
        "folder, or a step_* folder with COMPLETE)"
    )


def partial_folder(final: Path) -> Path:
    """An empty ``FINAL.partial`` folder next to ``final`` (a leftover of a killed run removed)."""
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def swap_in(partial: Path, final: Path) -> None:
    """Replace ``final`` by the finished ``partial``: two renames, the old folder removed last.
    At any kill, ``final`` is the old complete folder, absent, or the new complete folder —
    never half-written (the old one survives as ``FINAL.old`` in the short gap)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    if old.exists():
        shutil.rmtree(old)


def convert(
    path: str | Path, out: str | Path, dtype: str = "fp32", merge_lora: bool = True
) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dst_train.config import load_config
    from dst_train.model.backbone import load_image_processor, load_tokenizer
    from dst_train.model.build import Precision, build_model, save_lora_adapter
    from dst_train.model.build import merge_lora as merge

    t0 = time.perf_counter()
    ckpt_dir, tag = locate(path)
    problem = checkpoint.missing_shards(ckpt_dir / tag)
    if problem:
        raise FileNotFoundError(problem)
    cfg = load_config(ckpt_dir / tag / "config.yaml")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    mcfg = cfg.model
    qlora = mcfg.qlora
    # QLoRA: DeepSpeed saved the frozen 4-bit weights packed (uint8) and zero_to_fp32 dropped
    # their quantization state, so they cannot be loaded back. They never trained: the model is
    # built from the pretrained base in full precision, and only what trained (LoRA, heads,
    # unfrozen parts) comes from the checkpoint — merging then folds LoRA into the full-precision
    # base weights, the QLoRA way.
    mcfg.pretrained, mcfg.qlora, mcfg.gradient_checkpointing = qlora, False, False
    model = build_model(mcfg, cfg.head_config(), Precision("fp32", "sdpa"))
    if qlora:
        state = _trained_only(model, state, ckpt_dir / tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if (missing and not qlora) or unexpected:
        raise ValueError(
            f"{ckpt_dir / tag}: checkpoint does not match the model "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    del state
    final = Path(out)
    out = partial_folder(final)  # built aside, swapped in whole: a kill leaves OUT as it was
    hf = model.backbone.hf
    if cfg.model.lora and not merge_lora:
        save_lora_adapter(model, out / "lora_adapter")  # peft adapter folder
    elif cfg.model.lora:
        merge(model)
    torch_dtype = DTYPES[dtype]
    model.to(torch_dtype)
    hf.save_pretrained(out)
    model.save_heads(out)
    load_tokenizer(cfg.model.arch).save_pretrained(out)
    load_image_processor(cfg.model.arch).save_pretrained(out)
    (out / "run_config.yaml").write_text((ckpt_dir / tag / "config.yaml").read_text())
    swap_in(out, final)
    return {
        "out": str(final),
        "checkpoint": str(ckpt_dir / tag),
        "dtype": dtype,
        "seconds": time.perf_counter() - t0,
        "peak_ram_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _trained_only(model, state: dict, where: Path) -> dict:
    """The entries of ``state`` for the parameters that train; every one must be there."""
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    lost = [n for n in trained if n not in state]
    if lost:
        raise ValueError(f"{where}: the checkpoint lacks trained weights, e.g. {lost[:3]}")
    return {n: state[n] for n in trained}
