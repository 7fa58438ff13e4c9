"""The backbone seam: everything model-specific about the VLM sits behind :class:`Backbone`.

A backbone knows how frames become tokens (vision tower → pooling to k tokens → connector), where
the language model and its head are, and its chat format. The rest of dst-train (sequence
building, heads, losses, trainer, inference) talks only to this interface and to the loaders at
the end of this module, which pick the family from the transformers config's ``model_type``.

A family is one module (:mod:`~dst_train.model.smolvlm`, :mod:`~dst_train.model.qwen_vl`) with
its :class:`VLMBackbone` subclass, chat format, frame processor, QLoRA skip list and tiny config;
adding one is that module plus an entry in ``FAMILIES``.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CONFIG_DIR = Path(__file__).parent / "configs"
ARCHS = {  # name -> (architecture json, hub id of the real weights)
    "smolvlm2-256m": ("smolvlm2-256m.json", "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"),
    "smolvlm2-500m": ("smolvlm2-500m.json", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"),
    "smolvlm2-2.2b": ("smolvlm2-2.2b.json", "HuggingFaceTB/SmolVLM2-2.2B-Instruct"),
    "qwen2.5-vl-3b": ("qwen2.5-vl-3b.json", "Qwen/Qwen2.5-VL-3B-Instruct"),
    "qwen2.5-vl-7b": ("qwen2.5-vl-7b.json", "Qwen/Qwen2.5-VL-7B-Instruct"),
}
FAMILIES = {  # transformers model_type -> module of that family
    "smolvlm": "dst_train.model.smolvlm",
    "qwen2_5_vl": "dst_train.model.qwen_vl",
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
    patches_per_frame: int  # vision-tower positions per frame (FLOPs, memory estimates)
    native_tokens_per_frame: int  # LM tokens per frame the pretrained model used (no pooling)

    def frame_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) pixels — uint8 (normalized by the backbone) or normalized floats — →
        (N, P, Dv) pooled vision features (what the cache holds)."""

    def project_frames(self, features: torch.Tensor) -> torch.Tensor:
        """(N, P, Dv) pooled features → (N, k, H) LM input embeddings."""

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
    ):
        """LM trunk: (B, T, H) embeddings → ((B, T, H) last hidden states, cache)."""

    @property
    def lm_head(self) -> nn.Linear: ...

    def module_groups(self) -> dict[str, nn.Module]:
        """``vision``, ``connector``, ``lm`` (trunk + embeddings) and ``lm_head`` modules."""


class VLMBackbone(nn.Module):
    """What the families share: a transformers VLM whose parts are ``vision``, ``connector``,
    ``language_model`` (the LM trunk, replaceable: ``set_language_model``) and ``lm_head``. A family
    defines those properties, calls ``_set_grid`` (patch grid and merge factor) and defines
    ``_features`` (one vision-tower call: pixels → pooled features)."""

    chat: ChatFormat

    def __init__(self, hf_model, tokens_per_frame: int, vision_chunk: int):
        super().__init__()
        self.hf = hf_model
        self.vision_chunk = vision_chunk  # frames per vision-tower call; 0 = all at once
        cfg = hf_model.config
        self.hidden_size = cfg.text_config.hidden_size
        self.image_token_id = cfg.image_token_id
        self.tokens_per_frame = tokens_per_frame
        self.use_frame_processor(None)  # the family's processor for ``cfg``, made when needed

    # ---------------------------------------------------------------- frames
    def frame_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) pixels (uint8, or floats already normalized) → (N, P, Dv) pooled patch
        features, ``vision_chunk`` frames per tower call (0 = all at once).

        A tower with no trainable parameter runs without autograd, whatever hooks are on:
        gradient checkpointing's ``enable_input_require_grads`` marks the patch embeddings as
        requiring grad, and the frozen tower then kept ~56 MiB of activations per frame
        (smolvlm2-256m, fp32) for a backward that changes nothing in it."""
        # the tower's own weights: Qwen's merger sits inside ``visual`` and may train while the
        # tower is frozen; it must not switch autograd on for the whole tower
        params = list(self.module_groups()["vision"].parameters())
        dtype = params[0].dtype
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        # ZeRO-3 gathers the tower's weights at every call, a collective: the number of calls
        # must not depend on this rank's frame count, so there all frames go in one call
        zero3 = hasattr(params[0], "ds_id")
        step = len(pixel_values) if zero3 or not self.vision_chunk else self.vision_chunk
        with torch.set_grad_enabled(grad):
            parts = [
                self._features(self._tower_input(x, dtype))
                for x in pixel_values.split(max(step, 1))
            ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _tower_input(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One chunk of frames as the tower takes them: 8-bit pixels normalized here, so only
        the chunk is ever in fp32; float pixels are taken as already normalized."""
        if pixels.dtype == torch.uint8:
            pixels = normalize_pixels(pixels, self.pixel_table(pixels.device))
        return pixels.to(dtype=dtype)

    def use_frame_processor(self, processor: FrameProcessor | None) -> None:
        """Normalize 8-bit frames as ``processor`` does (a model folder's own processor; the
        default is the family's processor for this model's config)."""
        self._frame_processor, self._pixel_tables = processor, {}

    def pixel_table(self, device: torch.device) -> torch.Tensor:
        """(3, 256) fp32 on ``device``: :func:`pixel_table` of the frame processor, made once."""
        if device not in self._pixel_tables:
            processor = self._frame_processor
            if processor is None:
                config = self.hf.config
                processor = family(config.model_type).frame_processor(config)
            self._pixel_tables[device] = pixel_table(processor).to(device)
        return self._pixel_tables[device]

    def _set_grid(self, grid: int, merge: int) -> None:
        """The frame geometry: a ``grid``×``grid`` patch grid, ``merge``×``merge`` patches per
        LM token; checks that k tokens per frame fit it."""
        self.grid, self.merge = grid, merge
        self.patches_per_frame = grid**2
        self.native_tokens_per_frame = (grid // merge) ** 2
        self.pooled_grid = check_tokens_per_frame(self.tokens_per_frame, grid, merge)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def vision(self) -> nn.Module:
        raise NotImplementedError

    @property
    def connector(self) -> nn.Module:
        raise NotImplementedError

    @property
    def language_model(self) -> nn.Module:
        raise NotImplementedError

    def set_language_model(self, module: nn.Module) -> None:
        """Replace the LM trunk (LoRA wraps or unwraps it). A method, not a property setter:
        ``nn.Module.__setattr__`` would register an assigned module as a new child instead."""
        raise NotImplementedError

    # --------------------------------------------------------------- language
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def decode(
        self,
        inputs_embeds,
        attention_mask=None,
        past_key_values=None,
        use_cache=False,
        position_ids=None,
    ):
        out = self.language_model(
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
            "vision": self.vision,
            "connector": self.connector,
            "lm": self.language_model,
            "lm_head": self.hf.lm_head,
        }

    def cache_identity(self) -> dict:
        """What the cached features depend on besides k and the frame size: the tower's shape."""
        return self.hf.config.vision_config.to_dict()

    def shape(self) -> BackboneShape:
        return BackboneShape.of(self.hf.config, self.merge)


@dataclass(frozen=True)
class BackboneShape:
    """The sizes the memory estimates need (see :mod:`dst_train.tune.worst_case`)."""

    lm_layers: int
    lm_hidden: int
    vocab_size: int
    vision_layers: int
    vision_hidden: int
    patch_size: int  # pixels
    merge: int  # patch-grid side per LM-token side (pixel-shuffle scale, Qwen's spatial merge)

    @classmethod
    def of(cls, config, merge: int) -> BackboneShape:
        """From a transformers VLM config (both families have text_config/vision_config)."""
        t, v = config.text_config, config.vision_config
        return cls(
            merge=merge,
            lm_layers=t.num_hidden_layers,
            lm_hidden=t.hidden_size,
            vocab_size=t.vocab_size,
            vision_layers=v.num_hidden_layers,
            vision_hidden=v.hidden_size,
            patch_size=v.patch_size,
        )


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


class FrameProcessor(Protocol):
    """A family's frame preprocessing: one frame → one ``image_size``² image, no tiling.

    ``pixels`` is what travels (loader workers → collate → GPU): the sized frame in 8 bits, a
    quarter of the bytes of fp32. The backbone normalizes it on its device through
    :func:`pixel_table`; ``__call__`` is the family's own float pipeline, which that equals."""

    image_size: int  # pixels per side of the processed frame

    def pixels(self, images: list) -> torch.Tensor:
        """PIL images → (N, 3, S, S) uint8, sized as ``__call__`` sizes them (N may be 0)."""

    def __call__(self, images: list) -> torch.Tensor:
        """PIL images → (N, 3, S, S) float pixels, rescaled and normalized (N may be 0)."""

    def save_pretrained(self, folder: str | Path) -> None: ...


def pixel_table(processor: FrameProcessor) -> torch.Tensor:
    """(3, 256) fp32: what ``processor`` makes of each 8-bit value in each channel.

    Read off the processor's own output for a frame of its size that holds every value (a frame
    it does not resize), so :func:`normalize_pixels` equals ``processor(images)`` bit for bit,
    whatever its mean, std and arithmetic."""
    from PIL import Image

    s = processor.image_size
    if s * s < 256:
        raise ValueError(f"frame size {s}: too small to hold the 256 pixel values")
    ramp = (np.arange(s * s) % 256).astype(np.uint8).reshape(s, s)
    frame = Image.fromarray(np.repeat(ramp[..., None], 3, axis=2))
    with torch.device("cpu"):  # on the host, whatever default device the caller has set
        if not torch.equal(processor.pixels([frame])[0, 0], torch.from_numpy(ramp)):
            raise ValueError(f"{type(processor).__name__} changes a frame of its own size")
        return processor([frame])[0].reshape(3, -1)[:, :256].float().contiguous()


def normalize_pixels(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) uint8 → (N, 3, S, S) fp32 through ``table`` (:func:`pixel_table`), on the
    pixels' device. Transient memory: 4 bytes per value of int32 indices, 4 of output."""
    table = table.to(pixels.device)
    offsets = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=pixels.device)
    index = pixels.to(torch.int32) + offsets.view(1, 3, 1, 1)
    return F.embedding(index, table.reshape(-1, 1)).squeeze(-1)


# ------------------------------------------------------------------ loading
def family(model_type: str):
    """The module of the family whose transformers config has ``model_type``."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} has no dst-train backbone; known: {', '.join(FAMILIES)}"
        )
    return importlib.import_module(FAMILIES[model_type])


def family_of(arch: str):
    """The family module of an architecture name, model folder or hub id."""
    return family(arch_config(arch).model_type)


def make_backbone(hf_model, tokens_per_frame: int = 1, vision_chunk: int = 64) -> VLMBackbone:
    """The :class:`Backbone` over a loaded transformers model, of the model's family."""
    fam = family(hf_model.config.model_type)
    return fam.Backbone(hf_model, tokens_per_frame, vision_chunk)


def missing_model_folder(arch: str) -> str | None:
    """Why ``arch`` names no model, or None: a named architecture (``ARCHS``, ``tiny``), a hub id
    (``namespace/name``, not checked: it may be in the hub cache) and a folder with a
    ``config.json`` are models. Anything else that is not on disk is a missing folder, and so is
    ``runs/x`` when ``./runs`` is a local folder."""
    if arch in ARCHS or arch == "tiny":
        return None
    looks_local = (
        arch.startswith(("/", ".", "~"))
        or arch.count("/") != 1
        or Path(arch.split("/")[0]).is_dir()
        or Path(arch).exists()
    )
    if looks_local and not (Path(arch) / "config.json").is_file():
        return f"{arch}: no model folder there (no config.json)"
    return None


def arch_config(arch: str):
    """A transformers config from an architecture name, ``tiny``, a model folder or a hub id;
    FileNotFoundError for a folder that is not there (:func:`missing_model_folder`)."""
    from transformers import AutoConfig

    missing = missing_model_folder(arch)
    if missing:
        raise FileNotFoundError(
            f"{missing}; the named architectures are {', '.join(sorted(ARCHS))} and tiny"
        )
    if arch in ARCHS:
        raw = json.loads((CONFIG_DIR / ARCHS[arch][0]).read_text())
        raw.pop("_comment", None)
        return family(raw["model_type"]).config_class()(**raw)
    if arch == "tiny":
        from dst_train.model.smolvlm import tiny_config

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
    config = arch_config(arch)
    model_class = family(config.model_type).model_class()
    if pretrained:
        source = model_source(arch)  # a named architecture's weights come from its hub id
        if source == arch and arch != "tiny" and Path(arch).exists() and not has_weights(arch):
            raise FileNotFoundError(f"{arch}: no weights (*.safetensors) in this model folder")
        model, info = from_hub(
            arch,
            "weights",
            lambda: model_class.from_pretrained(
                source,
                dtype=dtype,
                attn_implementation=attention,
                quantization_config=quantization_config,
                output_loading_info=True,
            ),
        )
        missing = [k for k in info.get("missing_keys", []) if "rotary" not in k]
        if missing:  # transformers would silently leave these randomly initialised
            raise ValueError(
                f"{source}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}"
            )
        return model
    # _from_config honours a live HfDeepSpeedConfig (ZeRO-3: weights partitioned at construction)
    return model_class._from_config(config, dtype=dtype, attn_implementation=attention)


def model_source(arch: str) -> str:
    """Where tokenizer/processor files live: the folder, or the hub id of a named arch."""
    return ARCHS[arch][1] if arch in ARCHS else arch


def load_tokenizer(arch: str):
    from transformers import AutoTokenizer

    return from_hub(arch, "tokenizer", lambda: AutoTokenizer.from_pretrained(model_source(arch)))


def load_image_processor(arch: str) -> FrameProcessor:
    """The family's frame processor, configured from the model folder (or hub id)."""
    return from_hub(
        arch, "image processor", lambda: family_of(arch).load_frame_processor(model_source(arch))
    )


class ModelUnavailable(FileNotFoundError):
    """A named architecture's files are neither in the Hugging Face cache nor downloadable."""


def from_hub(arch: str, what: str, load):
    """``load()``, which reads ``what`` of ``arch`` with a ``from_pretrained``. For a named
    architecture, whose files come from its hub id, the OSError transformers raises when they are
    not cached and cannot be downloaded (an offline node) becomes :class:`ModelUnavailable`,
    which says how to get them."""
    try:
        return load()
    except OSError as e:
        if arch not in ARCHS:
            raise
        hub = ARCHS[arch][1]
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelUnavailable(
            f"model.arch={arch}: cannot load its {what} from {hub} ({first}). A node without a "
            "network reads them from the Hugging Face cache: download the model once where there "
            f"is one (`huggingface-cli download {hub}`, with the HF_HOME this job uses), or set "
            "model.arch to a model folder"
        ) from None
