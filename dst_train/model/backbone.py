"""The backbone seam: everything model-specific about the VLM sits behind :class:`Backbone`.

A backbone knows how frames become tokens (vision tower → pooling to k tokens → connector), where
the language model and its head are, and its chat format. The rest of dst-train (sequence
building, heads, losses, trainer, inference) talks only to this interface, so another VLM
(Idefics3, a Qwen-VL model) is one more module implementing it plus an entry in ``load_backbone``.

SmolVLM2 = SigLIP encoder → pixel-shuffle connector (scale s) → Llama LM. A frame's patch grid
(G×G) is average-pooled to (s·√k)×(s·√k) before the connector, so the pretrained connector still
sees s×s neighbourhoods of (pooled) patches and emits exactly k tokens per frame.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_DIR = Path(__file__).parent / "configs"
ARCHS = {  # name -> (architecture json, hub id of the real weights)
    "smolvlm2-256m": ("smolvlm2-256m.json", "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"),
    "smolvlm2-500m": ("smolvlm2-500m.json", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"),
    "smolvlm2-2.2b": ("smolvlm2-2.2b.json", "HuggingFaceTB/SmolVLM2-2.2B-Instruct"),
}


@dataclass(frozen=True)
class ChatFormat:
    """Text around each turn. Defaults follow SmolVLM2's chat template."""

    bos: str = "<|im_start|>"
    system: str = "System: "
    user: str = "User: "
    assistant: str = "Assistant: "
    dst: str = "State: "  # our dialog-state update turn
    end: str = "<end_of_utterance>"
    sep: str = "\n"
    image: str = "<image>"
    pad: str = "<pad>"


class Backbone(Protocol):
    """What dst-train needs from a VLM. Shapes: N frames, k tokens per frame, H LM hidden."""

    chat: ChatFormat
    hidden_size: int
    image_token_id: int
    tokens_per_frame: int

    def frame_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) pixels → (N, P, Dv) pooled vision features (what the cache holds)."""

    def project_frames(self, features: torch.Tensor) -> torch.Tensor:
        """(N, P, Dv) pooled features → (N, k, H) LM input embeddings."""

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ):
        """LM trunk: (B, T, H) embeddings → ((B, T, H) last hidden states, cache)."""

    @property
    def lm_head(self) -> nn.Linear: ...

    def module_groups(self) -> dict[str, nn.Module]:
        """``vision``, ``connector``, ``lm`` (trunk + embeddings) and ``lm_head`` modules."""


class SmolVLMBackbone(nn.Module):
    """:class:`Backbone` over transformers' ``SmolVLMForConditionalGeneration``."""

    chat = ChatFormat()

    def __init__(self, hf_model, tokens_per_frame: int = 1, vision_chunk: int = 64):
        super().__init__()
        self.hf = hf_model
        self.vision_chunk = vision_chunk  # frames per vision-tower call; 0 = all at once
        cfg = hf_model.config
        self.scale = cfg.scale_factor
        self.grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.hidden_size = cfg.text_config.hidden_size
        self.image_token_id = cfg.image_token_id
        self.tokens_per_frame = tokens_per_frame
        self.pooled_grid = check_tokens_per_frame(tokens_per_frame, self.grid, self.scale)

    # ---------------------------------------------------------------- frames
    def frame_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) pixels → (N, (s·√k)², Dv) pooled patch features, ``vision_chunk`` frames
        per tower call (0 = all at once).

        A tower with no trainable parameter runs without autograd, whatever hooks are on:
        gradient checkpointing's ``enable_input_require_grads`` marks the patch embeddings as
        requiring grad, and the frozen tower then kept ~56 MiB of activations per frame
        (smolvlm2-256m, fp32) for a backward that changes nothing in it."""
        vision = self.hf.model.vision_model
        params = list(vision.parameters())
        dtype = params[0].dtype
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        # ZeRO-3 gathers the tower's weights at every call, a collective: the number of calls
        # must not depend on this rank's frame count, so there all frames go in one call
        zero3 = hasattr(params[0], "ds_id")
        step = len(pixel_values) if zero3 or not self.vision_chunk else self.vision_chunk
        with torch.set_grad_enabled(grad):
            parts = [
                self._pooled(vision, x.to(dtype=dtype)) for x in pixel_values.split(max(step, 1))
            ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _pooled(self, vision, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = vision(pixel_values=pixel_values).last_hidden_state  # (N, G*G, Dv)
        return pool_patches(hidden, self.grid, self.pooled_grid)

    def project_frames(self, features: torch.Tensor) -> torch.Tensor:
        connector = self.hf.model.connector
        features = features.to(dtype=connector.modality_projection.proj.weight.dtype)
        return connector(features)  # (N, k, H)

    # --------------------------------------------------------------- language
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf.model.text_model.get_input_embeddings()(input_ids)

    def decode(
        self,
        inputs_embeds,
        attention_mask=None,
        past_key_values=None,
        use_cache=False,
        position_ids=None,
    ):
        out = self.hf.model.text_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_ids=position_ids,
        )
        return out.last_hidden_state, out.past_key_values

    @property
    def lm_head(self) -> nn.Linear:
        return self.hf.lm_head

    def module_groups(self) -> dict[str, nn.Module]:
        return {
            "vision": self.hf.model.vision_model,
            "connector": self.hf.model.connector,
            "lm": self.hf.model.text_model,
            "lm_head": self.hf.lm_head,
        }


def check_tokens_per_frame(k: int, grid: int, scale: int) -> int:
    """Pooled patch-grid side for k tokens per frame; k must be a square that fits the grid."""
    side = math.isqrt(k)
    if k < 1 or side * side != k:
        raise ValueError(f"tokens_per_frame must be a perfect square (1, 4, 9, ...), got {k}")
    pooled = side * scale
    if pooled > grid:
        raise ValueError(
            f"tokens_per_frame={k} needs a {pooled}x{pooled} patch grid but the vision "
            f"encoder gives {grid}x{grid}: at most {(grid // scale) ** 2} tokens"
        )
    return pooled


def pool_patches(hidden: torch.Tensor, grid: int, pooled: int) -> torch.Tensor:
    """(N, grid², D) patch features → (N, pooled², D) by adaptive average pooling."""
    if pooled == grid:
        return hidden
    n, _, d = hidden.shape
    x = hidden.view(n, grid, grid, d).permute(0, 3, 1, 2)  # (N, D, G, G)
    x = F.adaptive_avg_pool2d(x.float(), pooled).to(hidden.dtype)  # (N, D, g, g)
    return x.permute(0, 2, 3, 1).reshape(n, pooled * pooled, d)


# ------------------------------------------------------------------ loading
def arch_config(arch: str):
    """A SmolVLM config from an architecture name, a model folder, or a hub id."""
    from transformers import AutoConfig, SmolVLMConfig

    if arch in ARCHS:
        raw = json.loads((CONFIG_DIR / ARCHS[arch][0]).read_text())
        raw.pop("_comment", None)
        return SmolVLMConfig(**raw)
    if arch == "tiny":
        from dst_train.model.tiny import tiny_config

        return tiny_config()
    return AutoConfig.from_pretrained(arch)


def has_weights(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin")))


def load_hf_model(
    arch: str, pretrained: bool, dtype: torch.dtype, attention: str, quantization_config=None
):
    """transformers model: real weights (folder or hub id) when ``pretrained``, else random init
    from the architecture (a name, or a folder's config.json)."""
    from transformers import SmolVLMForConditionalGeneration

    if pretrained:
        if arch in ARCHS:
            arch = ARCHS[arch][1]  # hub id: works when the user has the weights cached
        elif arch != "tiny" and Path(arch).exists() and not has_weights(arch):
            raise FileNotFoundError(f"{arch}: no weights (*.safetensors) in this model folder")
        model, info = SmolVLMForConditionalGeneration.from_pretrained(
            arch,
            dtype=dtype,
            attn_implementation=attention,
            quantization_config=quantization_config,
            output_loading_info=True,
        )
        missing = [k for k in info.get("missing_keys", []) if "rotary" not in k]
        if missing:  # transformers would silently leave these randomly initialised
            raise ValueError(f"{arch}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
        return model
    config = arch_config(arch)
    # _from_config honours a live HfDeepSpeedConfig (ZeRO-3: weights partitioned at construction)
    return SmolVLMForConditionalGeneration._from_config(
        config, dtype=dtype, attn_implementation=attention
    )


def model_source(arch: str) -> str:
    """Where tokenizer/processor files live: the folder, or the hub id of a named arch."""
    return ARCHS[arch][1] if arch in ARCHS else arch


def load_tokenizer(arch: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_source(arch))


def load_image_processor(arch: str):
    """The PIL image processor (the default fast one needs torchvision), one image per frame."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    proc = SmolVLMImageProcessorPil.from_pretrained(model_source(arch))
    proc.do_image_splitting = False
    return proc
