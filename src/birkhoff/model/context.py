"""What every block of one forward shares: rotary tables, the attention mask, Engram rows
and Anticipatory Routing's planned experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceContext:
    """cos/sin are (T, D/2), or (B, T, D/2) when positions restart at document boundaries
    (None for V4 attention, which rotates by its own tables); `attention_mask` is None for
    plain causal attention, else (B, 1, T, T) bool (True = attend); `engram_rows` maps an
    Engram layer to its table rows (B, T, heads) computed by the loader; `positions` (B, T)
    restart at 0 where a packed document starts (None: 0..T-1 in every row); `planned_routes`
    maps a MoE layer to the experts Anticipatory Routing chose for it, (B, T', k) (held here,
    not by the layer, so that a checkpointed block recomputes with the same ones)."""

    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    engram_rows: dict[int, torch.Tensor] | None = None
    positions: torch.Tensor | None = None
    planned_routes: dict[int, torch.Tensor] | None = None

    def positions_for(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        if self.positions is not None:
            return self.positions
        return torch.arange(seq, device=device).expand(batch, -1)

    def truncated(self, length: int) -> SequenceContext:
        """The context of the first `length` positions (multi-token prediction depths)."""
        mask, positions = self.attention_mask, self.positions
        return SequenceContext(
            None if self.cos is None else self.cos[..., :length, :],
            None if self.sin is None else self.sin[..., :length, :],
            None if mask is None else mask[..., :length, :length],
            positions=None if positions is None else positions[:, :length],
            planned_routes=self.planned_routes,  # MTP layers' own, of their T - k positions
        )


def document_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: position i attends to j <= i of the same document. A document starts
    wherever the position id is 0, so packed windows need only their position ids."""
    document = torch.cumsum(positions == 0, dim=1)
    same_document = document[:, :, None] == document[:, None, :]
    seq = positions.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=positions.device).tril()
    return (same_document & causal).unsqueeze(1)
