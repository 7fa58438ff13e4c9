"""Binary decision heads (speak, update) read at the last token of every frame."""

from __future__ import annotations

import math

import torch
from torch import nn


class DecisionHead(nn.Module):
    """hidden (N, H) → logit (N,). ``hidden_dim=0``: one linear layer, else a 2-layer MLP."""

    def __init__(self, hidden_size: int, hidden_dim: int = 0, prior: float = 0.05):
        super().__init__()
        if hidden_dim:
            self.net = nn.Sequential(
                nn.Linear(hidden_size, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1)
            )
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, 1))
        # Start at the class prior (focal-loss paper, §4.1): rare positives do not swamp step 1.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, math.log(prior / (1 - prior)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden).squeeze(-1)
