"""Multi-token prediction (DeepSeek-V3 sec. 2.2, in DeepSeek-V4's form).

Depth k predicts token i+k+1 from position i. Its input is the previous depth's residual (the
main model's last residual for k = 1: all n mHC streams, before the readout) and the embedding of
token i+k: h' = W_h RMSNorm(h) + W_e RMSNorm(Emb(t_{i+k})), the embedding term added to every
stream (V4's MTPBlock; with one stream this is V3's M_k [RMSNorm(h); RMSNorm(Emb)]). Then a full
block (the model's attention, MoE and mHC; sliding-window-only under V4 attention, no Engram),
its own stream readout and final norm, and the shared output head. The model adds
loss_weight / D * sum_k CE_k to the main loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from birkhoff.model.config import ModelConfig
from birkhoff.model.context import SequenceContext
from birkhoff.model.mhc import StreamReadout
from birkhoff.model.norm import RMSNorm


class MTPDepth(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module, kernel_backend: str) -> None:
        super().__init__()
        c, eps = cfg.hidden_size, cfg.norm_eps
        self.hidden_norm = RMSNorm(c, eps, kernel_backend)
        self.embed_norm = RMSNorm(c, eps, kernel_backend)
        self.hidden_proj = nn.Linear(c, c, bias=False)
        self.embed_proj = nn.Linear(c, c, bias=False)
        self.block = block
        self.readout = (
            None
            if cfg.residual.mode == "plain"
            else StreamReadout(c, cfg.residual, kernel_backend, eps)
        )
        self.norm = RMSNorm(c, eps, kernel_backend)

    def forward(
        self,
        residual: torch.Tensor,
        next_embeddings: torch.Tensor,
        ctx: SequenceContext,
        tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """residual (B, T, C) or (B, T, n, C), next_embeddings (B, T, C) -> this depth's
        residual and its block's auxiliary loss."""
        embedded = self.embed_proj(self.embed_norm(next_embeddings))
        if residual.dim() == 4:
            embedded = embedded.unsqueeze(-2)
        x = self.hidden_proj(self.hidden_norm(residual)) + embedded
        return self.block(x, tokens, ctx)

    def hidden(self, residual: torch.Tensor) -> torch.Tensor:
        """The depth's residual -> the normed hidden state the shared head reads."""
        return self.norm(residual if self.readout is None else self.readout(residual))


def mtp_depths(
    depths: nn.ModuleList,
    residual: torch.Tensor,
    targets: torch.Tensor,
    target_embeddings: torch.Tensor,
    ctx: SequenceContext,
) -> Iterator[tuple[int, MTPDepth, torch.Tensor, torch.Tensor | None]]:
    """Each depth k run in turn on the residual before it: (k, depth, its residual, its
    block's auxiliary loss). `residual` is the main model's last residual; targets (B, T)
    are the next tokens, so t_{i+k} = targets[:, i+k-1], and target_embeddings (B, T, C)
    are Emb(targets) (computed once, where the embedding lives)."""
    for k, depth in enumerate(depths, start=1):
        length = targets.shape[1] - k
        if length <= 0:
            break
        inputs = targets[:, k - 1 : k - 1 + length]
        embedded = target_embeddings[:, k - 1 : k - 1 + length]
        residual, aux = depth(residual[:, :length], embedded, ctx.truncated(length), inputs)
        yield k, depth, residual, aux


def mtp_loss(
    depths: nn.ModuleList,
    residual: torch.Tensor,
    targets: torch.Tensor,
    target_embeddings: torch.Tensor,
    head_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ctx: SequenceContext,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mean cross-entropy over the depths (`mtp_depths`), and their blocks' auxiliary losses;
    `head_loss` (normed hidden, targets) is the shared head's cross-entropy."""
    losses, aux_losses = [], []
    for k, depth, hidden, aux in mtp_depths(depths, residual, targets, target_embeddings, ctx):
        if aux is not None:
            aux_losses.append(aux)
        losses.append(head_loss(depth.hidden(hidden), targets[:, k:]))
    return torch.stack(losses).mean(), aux_losses
