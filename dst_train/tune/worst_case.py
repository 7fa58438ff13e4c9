"""Which train sample makes a step peak highest: the one the autotuner probes, repeated b times.

Tokens alone do not decide it. With the vision tower running online, every frame puts its pixels
on the GPU (and, when the tower trains, its activations); every labelled position gets a row of
vocabulary logits in fp32. So samples are ranked by an estimate of the bytes they add to a step,
and when the top estimates are close (within ``margin``) the autotuner measures the candidates
with one probe each and takes the highest measured peak: the estimate only has to shortlist.
"""

from __future__ import annotations

from dataclasses import dataclass

from dst_train.data.sequence import IGNORE

# Activation bytes kept for backward per token, per layer, per hidden unit, in 16-bit training
# without recomputation (Korthikanti et al., 2022: 34·s·b·h per layer, attention scores aside);
# with checkpointing only each layer's input stays (2 bytes per hidden unit).
ACT_BYTES = 34
CHECKPOINTED_BYTES = 2
LOGIT_BYTES = 12  # fp32 logits, their softmax and their gradient, per vocabulary entry


@dataclass(frozen=True)
class SampleCost:
    """Estimated bytes one sample adds to a training step, by what scales them."""

    per_token: float
    per_frame: float
    per_label: float

    def of(self, tokens: int, frames: int, labels: int) -> float:
        return tokens * self.per_token + frames * self.per_frame + labels * self.per_label

    @classmethod
    def for_run(cls, cfg, shape, image_size: int) -> SampleCost:
        """From the run config, the backbone's sizes (a
        :class:`~dst_train.model.backbone.BackboneShape`) and the side of a frame in pixels."""
        per_unit = CHECKPOINTED_BYTES if cfg.model.gradient_checkpointing else ACT_BYTES
        per_token = shape.lm_layers * shape.lm_hidden * per_unit
        if cfg.data.feature_cache:  # cached pooled tower outputs: (merge·√k)² patches, 16-bit
            per_frame = shape.merge**2 * cfg.model.tokens_per_frame * shape.vision_hidden * 2
        else:
            per_frame = 3 * image_size * image_size  # the frame's 8-bit pixels
            if not cfg.model.freeze_vision:  # a training tower keeps its activations
                patches = (image_size // shape.patch_size) ** 2
                per_frame += patches * shape.vision_layers * shape.vision_hidden * per_unit
        return cls(per_token, per_frame, shape.vocab_size * LOGIT_BYTES)


def labelled_positions(sample) -> int:
    """Positions whose next token is trained on (response and DST text)."""
    return sum(t != IGNORE for t in sample.targets)


def worst_case_candidates(
    dataset, cost: SampleCost, margin: float = 0.05, limit: int = 4
) -> list[tuple[int, float]]:
    """``(index, estimated bytes)`` of the costliest samples: the top one and any other within
    ``margin`` of it (at most ``limit``), costliest first."""
    lengths = dataset.lengths()
    scored = sorted(
        (
            (
                cost.of(lengths[i], dataset.num_frames(i), labelled_positions(dataset.samples[i])),
                i,
            )
            for i in range(len(dataset))
        ),
        reverse=True,
    )
    top = scored[0][0]
    return [(i, c) for c, i in scored[:limit] if c >= (1 - margin) * top]
