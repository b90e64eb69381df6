"""RMSNorm module; the arithmetic is the `rms_norm` kernel."""

from __future__ import annotations

import torch
from torch import nn

from birkhoff import kernels
from birkhoff.model.init import constant


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernel_backend: str = "reference") -> None:
        super().__init__()
        self.eps = eps
        constant(self, "weight", lambda: torch.ones(dim))
        self._rms_norm = kernels.get("rms_norm", kernel_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._rms_norm(x, self.weight, self.eps)
