"""Build the model a run asks for: precision, weights, frozen parts, LoRA/QLoRA, checkpointing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dst_train.config import ModelConfig
from dst_train.model.backbone import family_of, load_hf_model, make_backbone
from dst_train.model.dst_model import DSTModel, HeadConfig
from dst_train.model.precision import DTYPES, device_capability, select_precision

GROUPS = ("vision", "connector", "lm", "lm_head", "heads", "lora")


@dataclass
class Precision:
    dtype: str  # fp16 | bf16 | fp32
    attention: str  # sdpa | eager | flash_attention_2

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


_DETECT = (-1, -1)


def resolve_precision(mcfg: ModelConfig, capability: tuple[int, int] | None = _DETECT) -> Precision:
    """dtype and attention for ``capability`` (None = CPU; default: the current device)."""
    if capability == _DETECT:
        capability = device_capability()
    return Precision(
        *select_precision(capability, mcfg.dtype, mcfg.attention, cpu_dtype=mcfg.cpu_dtype)
    )


def build_model(mcfg: ModelConfig, heads: HeadConfig, precision: Precision) -> DSTModel:
    """The DSTModel with every memory option of ``mcfg`` applied (on the current device context:
    call it under ``torch.device("meta")`` to count parameters without memory)."""
    quant = None
    if mcfg.qlora:
        quant = qlora_config(precision.torch_dtype, family_of(mcfg.arch).QUANT_SKIP)
    hf = load_hf_model(
        mcfg.arch,
        mcfg.pretrained,
        precision.torch_dtype,
        precision.attention,
        quantization_config=quant,
    )
    model = DSTModel(make_backbone(hf, heads.tokens_per_frame, mcfg.vision_chunk_frames), heads)
    for head in (model.speak_head, model.update_head):
        head.to(precision.torch_dtype)
    if mcfg.qlora:
        prepare_kbit(hf, mcfg)
    set_trainable(model, mcfg)
    if mcfg.lora:
        add_lora(model, mcfg)
    if mcfg.gradient_checkpointing:
        enable_checkpointing(hf, mcfg.gradient_checkpointing_reentrant)
    return model


def enable_checkpointing(hf, reentrant: bool) -> None:
    """Recompute LM/vision layer activations in backward (transformers' checkpointing)."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        hf.enable_input_require_grads()  # reentrant checkpoints need an input that has grad


def qlora_config(compute_dtype: torch.dtype, skip: list[str]):
    """nf4 weights with double quantization for the LM trunk (the QLoRA recipe); the modules in
    ``skip`` (the family's vision tower, connector and lm_head) stay in ``compute_dtype``.
    bitsandbytes runs 4-bit layers on the CPU too (slowly), which is how the tests train it."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=list(skip),
    )


def prepare_kbit(hf, mcfg: ModelConfig) -> None:
    """peft's preparation of a 4-bit model, on the top transformers model: the one that carries
    ``is_loaded_in_4bit`` (given the text model, peft saw no flag and skipped the preparation).
    It freezes every parameter (``set_trainable`` then unfreezes what the config trains), keeps
    norms and other small non-4-bit weights in fp32, and with checkpointing makes the inputs
    require grad."""
    from peft import prepare_model_for_kbit_training

    assert getattr(hf, "is_loaded_in_4bit", False), "qlora: the model was not loaded in 4 bits"
    prepare_model_for_kbit_training(
        hf,
        use_gradient_checkpointing=mcfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": mcfg.gradient_checkpointing_reentrant},
    )


def set_trainable(model: DSTModel, mcfg: ModelConfig) -> None:
    """Heads always train; vision/connector/LM follow the freeze flags (LoRA freezes the LM)."""
    groups = model.backbone.module_groups()
    frozen = {
        "vision": mcfg.freeze_vision,
        "connector": mcfg.freeze_connector,
        "lm": mcfg.freeze_lm or mcfg.lora,
        "lm_head": mcfg.freeze_lm or mcfg.lora,
    }
    for name, module in groups.items():
        module.requires_grad_(not frozen[name])
    for head in (model.speak_head, model.update_head):
        head.requires_grad_(True)


def add_lora(model: DSTModel, mcfg: ModelConfig) -> None:
    """LoRA adapters on the LM trunk's linear layers (peft); replaces the backbone's
    ``language_model`` in place."""
    from peft import LoraConfig, get_peft_model

    backbone = model.backbone
    config = LoraConfig(
        r=mcfg.lora_r,
        lora_alpha=mcfg.lora_alpha,
        lora_dropout=mcfg.lora_dropout,
        target_modules=list(mcfg.lora_targets),
        bias="none",
    )
    backbone.set_language_model(get_peft_model(backbone.language_model, config))


def merge_lora(model: DSTModel) -> None:
    """Fold LoRA adapters into the LM weights (for a plain transformers checkpoint)."""
    backbone = model.backbone
    if hasattr(backbone.language_model, "merge_and_unload"):
        backbone.set_language_model(backbone.language_model.merge_and_unload())


def save_lora_adapter(model: DSTModel, folder) -> None:
    """Write the LoRA adapter as a peft folder, then take the LoRA layers out of the model
    (weights left unmerged), so the backbone saves as the plain base model."""
    backbone = model.backbone
    backbone.language_model.save_pretrained(folder)
    backbone.set_language_model(backbone.language_model.unload())


def group_of(name: str) -> str:
    """Which part of the model a parameter name belongs to."""
    if "lora_" in name:
        return "lora"
    if name.startswith(("speak_head", "update_head")):
        return "heads"
    if ".connector." in name or ".visual.merger." in name:  # SmolVLM, Qwen-VL
        return "connector"
    if ".vision_model." in name or ".visual." in name:
        return "vision"
    if ".lm_head." in name:
        return "lm_head"
    return "lm"


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{group: {"total": n, "trainable": m}}`` plus an ``all`` row."""
    counts = {g: {"total": 0, "trainable": 0} for g in (*GROUPS, "all")}
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 leaves an empty local tensor
        if getattr(p, "quant_state", None) is not None:  # bitsandbytes packs 2 values per byte
            n *= 2
        for g in (group_of(name), "all"):
            counts[g]["total"] += n
            counts[g]["trainable"] += n if p.requires_grad else 0
    return counts
