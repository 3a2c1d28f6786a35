"""Dense feed-forward block, used by dense GPT blocks and as the MoE shared experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def activate(h_NF: torch.Tensor, gate_NF: torch.Tensor | None) -> torch.Tensor:
    """SwiGLU (silu(gate) ⊙ h) when a gate projection exists, else GELU(h). Shared by the dense
    feed-forward and the experts."""
    if gate_NF is None:
        return F.gelu(h_NF)
    return F.silu(gate_NF) * h_NF


class FeedForward(nn.Module):
    """SwiGLU (w2 · (silu(w3 x) ⊙ w1 x)) or GELU (w2 · gelu(w1 x)) MLP."""

    def __init__(self, d_model: int, hidden: int, activation: str):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False) if activation == "swiglu" else None

    def reset_parameters(self, init_std: float, num_layers: int) -> None:
        nn.init.normal_(self.w1.weight, std=init_std)
        if self.w3 is not None:
            nn.init.normal_(self.w3.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=init_std / math.sqrt(2 * num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w3(x) if self.w3 is not None else None
        return self.w2(activate(self.w1(x), gate))
