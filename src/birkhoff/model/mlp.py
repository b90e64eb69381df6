"""SwiGLU feed-forward block, with DeepSeek-V4's optional clamp."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up. With `limit` (V4's SwiGLU clamp, 10 in its configs) the gate is capped
    at `limit` from above and the linear part clipped to [-limit, limit] first, which bounds
    what one expert can add to the residual stream."""
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, limit: float | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.w_gate = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_up = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(swiglu(self.w_gate(x), self.w_up(x), self.limit))
