"""Grouped-query causal self-attention with rotary embeddings."""

from __future__ import annotations

import torch
from torch import nn

from birkhoff import kernels
from birkhoff.model.config import ModelConfig
from birkhoff.model.context import SequenceContext


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel_backend: str = "reference") -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self._rope = kernels.get("rope", kernel_backend)
        self._attention = kernels.get("attention", kernel_backend)

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        # Heads are inferred (-1): under tensor parallelism a rank holds heads / tp of them.
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = self._rope(q, k, ctx.cos, ctx.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = self._attention(q, k, v, ctx.attention_mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))
