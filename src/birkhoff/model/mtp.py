"""Multi-token prediction (DeepSeek-V3, arXiv 2412.19437 sec. 2.2).

Depth k predicts token i+k+1 from position i: h_k = Block_k(W_k [RMSNorm(h_{k-1}); RMSNorm(
Emb(t_{i+k}))]) over the first T-k positions, with the model's embedding and output head
shared. The model adds loss_weight / D * sum_k CE_k to the main loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from birkhoff.model.config import ModelConfig, ResidualConfig
from birkhoff.model.context import SequenceContext
from birkhoff.model.norm import RMSNorm


def mtp_block_config(cfg: ModelConfig) -> ModelConfig:
    """MTP blocks are single-stream dense blocks: no mHC streams, experts or Engram."""
    return dataclasses.replace(
        cfg,
        residual=ResidualConfig(mode="plain"),
        moe=dataclasses.replace(cfg.moe, num_experts=0),
        engram=dataclasses.replace(cfg.engram, layers=[]),
    )


class MTPDepth(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module, kernel_backend: str) -> None:
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, kernel_backend)
        self.embed_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, kernel_backend)
        self.proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = block

    def forward(
        self,
        hidden: torch.Tensor,
        next_embeddings: torch.Tensor,
        ctx: SequenceContext,
        tokens: torch.Tensor,
    ) -> torch.Tensor:
        joined = torch.cat((self.hidden_norm(hidden), self.embed_norm(next_embeddings)), dim=-1)
        return self.block(self.proj(joined), tokens, ctx)[0]


def mtp_loss(
    depths: nn.ModuleList,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    target_embeddings: torch.Tensor,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    ctx: SequenceContext,
) -> torch.Tensor:
    """Mean cross-entropy over the depths. hidden (B, T, C) is the main model's last hidden
    state; targets (B, T) are the next tokens, so t_{i+k} = targets[:, i+k-1], and
    target_embeddings (B, T, C) are Emb(targets) (computed once, where the embedding lives)."""
    losses = []
    for k, depth in enumerate(depths, start=1):
        length = targets.shape[1] - k
        if length <= 0:
            break
        inputs = targets[:, k - 1 : k - 1 + length]
        embedded = target_embeddings[:, k - 1 : k - 1 + length]
        hidden = depth(hidden[:, :length], embedded, ctx.truncated(length), inputs)
        logits = logits_of(hidden)
        losses.append(F.cross_entropy(logits.flatten(0, 1).float(), targets[:, k:].flatten()))
    return torch.stack(losses).mean()
