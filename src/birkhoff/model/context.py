"""What every block of one forward shares: rotary tables, the attention mask and Engram rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceContext:
    """cos/sin are (T, D/2), or (B, T, D/2) when positions restart at document boundaries;
    `attention_mask` is None for plain causal attention, else (B, 1, T, T) bool (True = attend);
    `engram_rows` maps an Engram layer to its table rows (B, T, heads) computed by the loader."""

    cos: torch.Tensor
    sin: torch.Tensor
    attention_mask: torch.Tensor | None = None
    engram_rows: dict[int, torch.Tensor] | None = None

    def truncated(self, length: int) -> SequenceContext:
        """The context of the first `length` positions (multi-token prediction depths)."""
        mask = self.attention_mask
        return SequenceContext(
            self.cos[..., :length, :],
            self.sin[..., :length, :],
            None if mask is None else mask[..., :length, :length],
        )


def document_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: position i attends to j <= i of the same document. A document starts
    wherever the position id is 0, so packed windows need only their position ids."""
    document = torch.cumsum(positions == 0, dim=1)
    same_document = document[:, :, None] == document[:, None, :]
    seq = positions.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=positions.device).tril()
    return (same_document & causal).unsqueeze(1)
