"""Qwen2.5-VL behind the backbone seam: a windowed ViT (14-px patches, 2D RoPE) → patch merger
(2×2 patches → one LM-width token) → Qwen2.5 LM with multimodal RoPE.

Frames: each is resized to a fixed S×S (``frame_size``, default 448 = 32×32 patches, a multiple
of patch × merge = 28) and normalized with CLIP's mean/std, as Qwen's processor does. Like Qwen's
own image path, a still frame fills the temporal patch (2 copies) and is its own image
(``grid_thw = [1, G, G]``): frames never attend to each other inside the tower.

k tokens per frame: the tower's final hidden states (before the merger, un-windowed back to the
row-major grid) are average-pooled from G×G to (2√k)×(2√k) patches, and the pretrained merger
turns each 2×2 neighbourhood into one token — the same split as SmolVLM's connector, so the
feature cache holds the pooled tower output and the merger can train. With k = (G/2)² nothing is
pooled and the tokens equal ``model.visual``'s own output (tested).

Positions: the LM is called without position ids in training, and with one counter per stream
in inference; Qwen's text model then gives every token — frame tokens included — the same
position on all three M-RoPE axes (t = h = w). For k = 1 that is exactly Qwen's rule for a 1×1
image; docs/model.md says why the counter is kept for k > 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dst_train.model.backbone import ChatFormat, VLMBackbone, pool_patches

CHAT = ChatFormat(
    bos="<|im_start|>",
    system="system\n",
    user="<|im_start|>user\n",
    assistant="<|im_start|>assistant\n",
    dst="<|im_start|>state\n",
    end="<|im_end|>",
    sep="\n",
    image="<|image_pad|>",
    pad="<|endoftext|>",
)
QUANT_SKIP = ["model.visual", "lm_head"]  # the tower and its merger stay in 16 bits
FRAME_SIZE = 448  # default frame side in pixels when a model folder does not say
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen's processor normalizes with CLIP's
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def config_class():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig


def model_class():
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


def frame_size(config) -> int:
    """The frame side the model was set up with (``dst_frame_size`` in its config.json)."""
    return getattr(config, "dst_frame_size", None) or FRAME_SIZE


class QwenVLBackbone(VLMBackbone):
    """:class:`~dst_train.model.backbone.Backbone` over ``Qwen2_5_VLForConditionalGeneration``."""

    chat = CHAT

    def __init__(self, hf_model, tokens_per_frame: int, vision_chunk: int):
        super().__init__(hf_model, tokens_per_frame, vision_chunk)
        v = hf_model.config.vision_config
        self.patch, self.temporal = v.patch_size, v.temporal_patch_size
        size, unit = frame_size(hf_model.config), v.patch_size * v.spatial_merge_size
        if size % unit:
            raise ValueError(f"frame size {size} must be a multiple of {unit}")
        self._set_grid(size // self.patch, v.spatial_merge_size)

    @property
    def vision(self) -> nn.Module:
        return self.hf.model.visual

    @property
    def connector(self) -> nn.Module:
        return self.hf.model.visual.merger

    @property
    def language_model(self) -> nn.Module:
        return self.hf.model.language_model

    def set_language_model(self, module: nn.Module) -> None:
        self.hf.model.language_model = module

    def module_groups(self) -> dict[str, nn.Module]:
        # the merger lives inside ``visual``: the tower's group is everything else in it
        groups = super().module_groups()
        groups["vision"] = _Without(self.vision, "merger")
        return groups

    def patches(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) → flattened patches (N·G², 3·T·P·P) in Qwen's order (2×2 merge blocks
        consecutive) and ``grid_thw`` (N, 3) = [1, G, G] per frame."""
        n, c, s, _ = pixel_values.shape
        g, m, p, t = s // self.patch, self.merge, self.patch, self.temporal
        x = pixel_values[:, None].expand(n, t, c, s, s)  # a still frame fills the temporal patch
        x = x.reshape(n, t, c, g // m, m, p, g // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        grid = torch.tensor([[1, g, g]] * n, device=pixel_values.device)
        return x.reshape(n * g * g, c * t * p * p), grid

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) → (N, 4k, Dv): the tower's last hidden states (before the merger),
        pooled to (2√k)² patches, 2×2 merge blocks consecutive (what the merger groups)."""
        from transformers.vision_utils import get_vision_window_index

        n, m = len(pixel_values), self.merge
        patches, grid = self.patches(pixel_values)
        hidden = self.vision(hidden_states=patches, grid_thw=grid).last_hidden_state
        # the tower returns its states in window order; undo it (per 2×2 block, as Qwen does)
        window, _ = get_vision_window_index(grid, m, self.vision.window_size, self.patch)
        d = hidden.shape[-1]
        hidden = hidden.view(-1, m * m, d)[torch.argsort(window.to(hidden.device))]
        g, q = self.grid, self.pooled_grid
        rows = hidden.view(n, g // m, g // m, m, m, d).permute(0, 1, 3, 2, 4, 5)
        pooled = pool_patches(rows.reshape(n, g * g, d), g, q)  # (N, q², Dv) row-major
        blocks = pooled.view(n, q // m, m, q // m, m, d).permute(0, 1, 3, 2, 4, 5)
        return blocks.reshape(n, q * q, d)

    def project_frames(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 4k, Dv) → (N, k, H) through the merger."""
        merger = self.connector
        n = len(features)
        features = features.to(dtype=merger.mlp[0].weight.dtype)
        return merger(features.reshape(-1, features.shape[-1])).view(n, self.tokens_per_frame, -1)


Backbone = QwenVLBackbone


class _Without(nn.Module):
    """``module``'s children and own parameters except the child ``skip``, as a module of their
    own: a group to freeze and count. Nothing stores it, so the model's tree is unchanged."""

    def __init__(self, module: nn.Module, skip: str):
        super().__init__()
        for name, child in module.named_children():
            if name != skip:
                self.add_module(name, child)
        for name, param in module.named_parameters(recurse=False):
            self.register_parameter(name, param)


# ------------------------------------------------------------------ frames
class QwenFrames:
    """Frame → ``image_size``² pixels: bicubic resize, scale to [0, 1], CLIP mean/std.

    Saved as a ``preprocessor_config.json`` that Qwen's own image processor reads with the same
    fixed size (min = max pixels = S²) and the tower's patch, merge and temporal sizes, plus
    ``dst_frame_size``."""

    def __init__(
        self,
        image_size: int = FRAME_SIZE,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        patch_size: int = 14,
        merge_size: int = 2,
        temporal_patch_size: int = 2,
    ):
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        # not used here (the backbone cuts patches from the config); written for Qwen's processor
        self.tower = {
            "patch_size": patch_size,
            "merge_size": merge_size,
            "temporal_patch_size": temporal_patch_size,
        }

    def pixels(self, images: list) -> torch.Tensor:
        """(N, 3, S, S) uint8: each frame in RGB, bicubic-resized to S² (a no-op at S²)."""
        from PIL import Image

        s = self.image_size
        if not images:
            return torch.zeros(0, 3, s, s, dtype=torch.uint8)
        arrays = [
            np.asarray(im.convert("RGB").resize((s, s), Image.Resampling.BICUBIC)) for im in images
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def __call__(self, images: list) -> torch.Tensor:
        x = self.pixels(images).float() / 255.0
        return (x - self.mean) / self.std

    def save_pretrained(self, folder: str | Path) -> None:
        s = self.image_size
        config = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "image_mean": self.mean.flatten().tolist(),
            "image_std": self.std.flatten().tolist(),
            "min_pixels": s * s,
            "max_pixels": s * s,
            "size": {"shortest_edge": s * s, "longest_edge": s * s},
            **self.tower,
            "dst_frame_size": s,
        }
        path = Path(folder) / "preprocessor_config.json"
        path.write_text(json.dumps(config, indent=2))


def frame_processor(config) -> QwenFrames:
    """The frame processor of the model ``config``: its frame size and tower sizes."""
    v = config.vision_config
    return QwenFrames(
        frame_size(config),
        patch_size=v.patch_size,
        merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size,
    )


def load_frame_processor(source: str) -> QwenFrames:
    """From a folder's ``preprocessor_config.json`` (a hub folder: its mean/std at the default
    frame size), or the default one when the source has none."""
    from transformers.utils import cached_file

    name = "preprocessor_config.json"
    if Path(source).is_dir():
        path = Path(source) / name
        path = path if path.is_file() else None
    else:  # a hub id (the files must be cached: nothing here downloads by surprise offline)
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
    if path is None:
        return QwenFrames()
    raw = json.loads(Path(path).read_text())
    tower = ("patch_size", "merge_size", "temporal_patch_size")
    return QwenFrames(
        raw.get("dst_frame_size", FRAME_SIZE),
        raw.get("image_mean", CLIP_MEAN),
        raw.get("image_std", CLIP_STD),
        **{k: raw[k] for k in tower if k in raw},
    )


def tiny_config(
    vocab_size: int = 1024,
    image_token_id: int = 3,
    hidden: int = 64,
    layers: int = 2,
    frame_size: int = 64,
):
    """LM ``hidden`` × ``layers`` (heads of 16 dims, M-RoPE sections 2/3/3), vision hidden 32 ×
    2 blocks (the first windowed, the second full attention), patch 8, merge 2, 64-px frames →
    8×8 patches, 16 tokens per frame natively."""
    from dst_train.model.smolvlm import check_tiny_shape

    check_tiny_shape(hidden, layers)
    return config_class()(
        image_token_id=image_token_id,
        tie_word_embeddings=False,
        dst_frame_size=frame_size,
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": hidden // 16,
            "num_key_value_heads": max(hidden // 32, 1),
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],  # of the 8 rotary pairs of a 16-dim head
                "rope_theta": 1e6,
            },
            "tie_word_embeddings": False,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 32,  # 2×2 merge blocks per window: window order ≠ row-major order
            "fullatt_block_indexes": [1],
            "out_hidden_size": hidden,
        },
    )
