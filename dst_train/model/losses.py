"""Losses, all computed in fp32 on the few positions that carry labels.

Binary focal loss (Lin et al. 2017) for the rare speak/update decisions:
``FL(p_t) = -alpha_t * (1 - p_t)**gamma * log(p_t)`` with ``alpha_t = alpha`` for positives and
``1 - alpha`` for negatives. ``gamma = 0`` and ``alpha = None`` is plain binary cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def binary_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean focal loss over the positions with ``weight > 0``.

    logits, targets, weight: (N,). Targets are 0/1. Returns a 0-dim fp32 tensor; with no position
    left it returns ``0 * logits.sum()`` so the graph (and every rank's collective) still runs.
    """
    logits, targets = logits.float(), targets.float()
    if weight is None:
        weight = torch.ones_like(logits)
    weight = weight.float()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # -log(p_t)
    if gamma:
        p_t = torch.exp(-ce)
        ce = (1.0 - p_t).pow(gamma) * ce
    if alpha is not None:
        ce = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * ce
    total = weight.sum()
    if total == 0:
        return logits.sum() * 0.0
    return (ce * weight).sum() / total


def token_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """Mean (focal) cross-entropy over tokens. logits (N, V), targets (N,)."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
    if gamma:
        nll = (1.0 - torch.exp(-nll)).pow(gamma) * nll
    return nll.mean()
