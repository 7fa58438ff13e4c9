"""SmolVLM2 behind the backbone seam: SigLIP encoder → pixel-shuffle connector (scale s) → Llama LM.

A frame's patch grid (G×G) is average-pooled to (s·√k)×(s·√k) before the connector, so the
pretrained connector still sees s×s neighbourhoods of (pooled) patches and emits exactly k tokens
per frame. Frames are one image each (no tiling), at the tower's native size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dst_train.model.backbone import ChatFormat, VLMBackbone, pool_patches

CHAT = ChatFormat()  # the defaults are SmolVLM2's chat template
# full module paths: transformers 5 matches these from the start of the name (or as a suffix),
# so "vision_model" alone matched nothing and the tower was quantized too
QUANT_SKIP = ["model.vision_model", "model.connector", "lm_head"]


def config_class():
    from transformers import SmolVLMConfig

    return SmolVLMConfig


def model_class():
    from transformers import SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration


class SmolVLMBackbone(VLMBackbone):
    """:class:`~dst_train.model.backbone.Backbone` over ``SmolVLMForConditionalGeneration``."""

    chat = CHAT

    def __init__(self, hf_model, tokens_per_frame: int, vision_chunk: int):
        super().__init__(hf_model, tokens_per_frame, vision_chunk)
        v = hf_model.config.vision_config
        self._set_grid(v.image_size // v.patch_size, hf_model.config.scale_factor)

    @property
    def vision(self) -> nn.Module:
        return self.hf.model.vision_model

    @property
    def connector(self) -> nn.Module:
        return self.hf.model.connector

    @property
    def language_model(self) -> nn.Module:
        return self.hf.model.text_model

    def set_language_model(self, module: nn.Module) -> None:
        self.hf.model.text_model = module

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state  # (N, G*G, Dv)
        return pool_patches(hidden, self.grid, self.pooled_grid)

    def project_frames(self, features: torch.Tensor) -> torch.Tensor:
        connector = self.connector
        features = features.to(dtype=connector.modality_projection.proj.weight.dtype)
        return connector(features)  # (N, k, H)


Backbone = SmolVLMBackbone


class SmolVLMFrames:
    """SmolVLM's PIL image processor (the default one needs torchvision) without image
    splitting: one frame → one ``image_size``² image."""

    def __init__(self, processor):
        processor.do_image_splitting = False
        self.processor = processor
        self.image_size = processor.max_image_size["longest_edge"]

    def __call__(self, images: list) -> torch.Tensor:
        if not images:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        out = self.processor([[im] for im in images], return_tensors="pt")
        return out["pixel_values"][:, 0]

    def pixels(self, images: list) -> torch.Tensor:
        """(N, 3, S, S) uint8. An RGB frame already S² (ProAssist's 384-px frames at 384) is
        taken as it is — the processor's resize returns it unchanged, and skipping the processor
        took a 384-px frame, JPEG decode included, from 10.6–12.3 ms to 1.4–1.5 ms on the
        development machine (benchmarks/frame_pixels.py); any other is resized by the processor,
        without its rescale and normalize."""
        s = self.image_size
        arrays = [
            np.asarray(im) if im.mode == "RGB" and im.size == (s, s) else self._resized(im)
            for im in images
        ]
        if not arrays:
            return torch.zeros(0, 3, s, s, dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def _resized(self, image) -> np.ndarray:
        """(S, S, 3) uint8: the processor's resizing (PIL, 8-bit in and out) of one image."""
        out = self.processor([[image]], do_rescale=False, do_normalize=False, return_tensors="np")
        chw = out["pixel_values"][0, 0]  # (3, S, S) floats holding the 8-bit values
        return np.rint(chw).astype(np.uint8).transpose(1, 2, 0)

    def save_pretrained(self, folder: str | Path) -> None:
        self.processor.save_pretrained(folder)


def frame_processor(config) -> SmolVLMFrames:
    """The frame processor of the model ``config``: frames at the tower's image size."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    size = frame_size(config)
    return SmolVLMFrames(
        SmolVLMImageProcessorPil(
            do_image_splitting=False,
            size={"longest_edge": size},
            max_image_size={"longest_edge": size},
        )
    )


def load_frame_processor(source: str) -> SmolVLMFrames:
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    return SmolVLMFrames(SmolVLMImageProcessorPil.from_pretrained(source))


def frame_size(config) -> int:
    return config.vision_config.image_size


TINY_IMAGE_SIZE = 32


def tiny_config(vocab_size: int = 1024, image_token_id: int = 3, hidden: int = 64, layers: int = 2):
    """LM ``hidden`` × ``layers`` (default 64 × 2), vision hidden 32 × 2 layers, image 32 / patch 8,
    scale 2 → 4 tokens per image natively (~0.2 M parameters with a 1k vocabulary by default)."""
    from transformers import SmolVLMConfig

    check_tiny_shape(hidden, layers)
    return SmolVLMConfig(
        image_token_id=image_token_id,
        scale_factor=2,
        tie_word_embeddings=False,
        text_config={
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": hidden // 16,
            "num_key_value_heads": max(hidden // 32, 1),
            "vocab_size": vocab_size,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={
            "model_type": "smolvlm_vision",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 8,
        },
    )


def check_tiny_shape(hidden: int, layers: int) -> None:
    if hidden < 32 or hidden % 32 or layers < 1:
        # heads of 16 dims and half as many key/value heads: hidden must split evenly in both
        raise ValueError(
            f"tiny model: hidden {hidden} must be a multiple of 32, layers {layers} >= 1"
        )
