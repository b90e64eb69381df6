"""SwiGLU feed-forward block, with DeepSeek-V4's optional clamp (the activation is the kernel
registry's `swiglu` op)."""

from __future__ import annotations

import torch
from torch import nn

from birkhoff import kernels
from birkhoff.kernels.registry import REFERENCE


class SwiGLU(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        limit: float | None = None,
        kernel_backend: str = REFERENCE,
    ) -> None:
        super().__init__()
        self.limit = limit
        self.w_gate = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_up = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w_down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)
        self._swiglu = kernels.get("swiglu", kernel_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self._swiglu(self.w_gate(x), self.w_up(x), self.limit))
