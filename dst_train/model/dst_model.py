"""The multi-task model: a VLM backbone + speak/update heads + selective LM losses.

Saved as a model folder that plain transformers can load (the backbone, ``config.json`` +
``model.safetensors`` + tokenizer + processor) plus two files of ours:

* ``dst_heads.safetensors`` — the speak and update heads (keys ``speak_head.*``, ``update_head.*``);
* ``dst_config.json`` — tokens per frame, head size and the loss settings.

``DSTModel.from_pretrained(folder)`` loads all three.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dst_train.data.sequence import DST, RESPONSE
from dst_train.model.backbone import Backbone
from dst_train.model.heads import DecisionHead
from dst_train.model.losses import binary_focal_loss, token_loss

HEADS_FILE = "dst_heads.safetensors"
CONFIG_FILE = "dst_config.json"


@dataclass
class HeadConfig:
    """Everything the heads and losses need; saved as ``dst_config.json``."""

    tokens_per_frame: int = 1
    head_hidden: int = 0  # 0 = linear heads, else hidden width of a 2-layer MLP
    decision_loss: str = "focal"  # focal | bce, for speak and update
    focal_alpha: float = 0.25  # weight of positives (negatives get 1 - alpha)
    focal_gamma: float = 2.0
    text_focal_gamma: float = 0.0  # 0 = plain cross-entropy on response/DST tokens
    speak_weight: float = 1.0  # loss weights; the total is the weighted sum
    update_weight: float = 1.0
    response_weight: float = 1.0
    dst_weight: float = 1.0


def check_model_folder(folder: str | Path) -> Path:
    """``folder`` as a Path; raises FileNotFoundError naming what is missing when it is not a
    dst-train model folder (the output of ``dst-train convert``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    for name in (CONFIG_FILE, HEADS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder}: missing {name} (not a dst-train model folder; make one from a "
                "checkpoint with `dst-train convert`)"
            )
    return folder


class DSTModel(nn.Module):
    def __init__(self, backbone: Backbone, cfg: HeadConfig):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        h = backbone.hidden_size
        self.speak_head = DecisionHead(h, cfg.head_hidden)
        self.update_head = DecisionHead(h, cfg.head_hidden)

    # ------------------------------------------------------------- inputs
    def frame_embeddings(self, pixel_values=None, frame_features=None) -> torch.Tensor:
        """Frames → (D, k, H) LM embeddings, from pixels (vision tower runs; uint8 pixels are
        normalized on their device) or cached features."""
        if frame_features is None:
            frame_features = self.backbone.frame_features(pixel_values)
        return self.backbone.project_frames(frame_features)

    def embed(self, input_ids: torch.Tensor, frame_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with every image token replaced by its frame embedding, in order."""
        embeds = self.backbone.embed_tokens(input_ids)  # (B, T, H)
        slots = input_ids == self.backbone.image_token_id
        n_slots = int(slots.sum())
        if frame_embeds is None or frame_embeds.numel() == 0:
            if n_slots:
                raise ValueError(f"{n_slots} image tokens but no frames given")
            return embeds
        flat = frame_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        if flat.shape[0] != n_slots:
            raise ValueError(f"{n_slots} image tokens but {flat.shape[0]} frame embeddings")
        return embeds.masked_scatter(slots[..., None], flat)

    # ------------------------------------------------------------- forward
    def forward(
        self,
        input_ids,
        attention_mask,
        decision_index,
        speak,
        update,
        targets,
        target_kind,
        speak_weight=None,
        update_weight=None,
        pixel_values=None,
        frame_features=None,
    ) -> dict:
        """All four losses (fp32) and the decision logits. See data/collate.py for shapes."""
        frames = self.frame_embeddings(pixel_values, frame_features)
        hidden, _ = self.backbone.decode(self.embed(input_ids, frames), attention_mask)
        dec = hidden[decision_index[:, 0], decision_index[:, 1]]  # (D, H)
        speak_logits = self.speak_head(dec)
        update_logits = self.update_head(dec)
        c = self.cfg
        alpha, gamma = (c.focal_alpha, c.focal_gamma) if c.decision_loss == "focal" else (None, 0.0)
        out = {
            "speak_loss": binary_focal_loss(speak_logits, speak, alpha, gamma, speak_weight),
            "update_loss": binary_focal_loss(update_logits, update, alpha, gamma, update_weight),
            "speak_logits": speak_logits,
            "update_logits": update_logits,
        }
        for name, kind in (("response_loss", RESPONSE), ("dst_loss", DST)):
            where = target_kind == kind  # only labelled positions reach the LM head
            logits = self.backbone.lm_head(hidden[where])  # (N_kind, V)
            out[name] = token_loss(logits, targets[where], c.text_focal_gamma)
        out["loss"] = (
            c.speak_weight * out["speak_loss"]
            + c.update_weight * out["update_loss"]
            + c.response_weight * out["response_loss"]
            + c.dst_weight * out["dst_loss"]
        )
        return out

    # --------------------------------------------------------------- saving
    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def save_heads(
        self, folder: str | Path, state_dict: dict | None = None, dtype: torch.dtype | None = None
    ) -> None:
        from safetensors.torch import save_file

        sd = state_dict if state_dict is not None else self.heads_state_dict()
        sd = {k: (v.to(dtype) if dtype else v).contiguous().cpu() for k, v in sd.items()}
        save_file(sd, str(Path(folder) / HEADS_FILE))
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2))

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, attention: str = "sdpa"
    ) -> DSTModel:
        """Backbone with plain transformers, then our heads from ``dst_heads.safetensors``; 8-bit
        frames are normalized as the folder's own image processor does, when it has one."""
        from safetensors.torch import load_file

        from dst_train.model.backbone import load_hf_model, load_image_processor, make_backbone

        folder = check_model_folder(folder)
        cfg = HeadConfig(**json.loads((folder / CONFIG_FILE).read_text()))
        hf = load_hf_model(str(folder), pretrained=True, dtype=dtype, attention=attention)
        model = cls(make_backbone(hf, cfg.tokens_per_frame), cfg)
        if (folder / "preprocessor_config.json").is_file():
            model.backbone.use_frame_processor(load_image_processor(str(folder)))
        missing, unexpected = model.load_state_dict(
            load_file(str(folder / HEADS_FILE)), strict=False
        )
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"{folder / HEADS_FILE}: missing {missing}, unexpected {unexpected}")
        return model.to(dtype)
