"""A training batch, and what the loader adds to packed windows: document positions and
Engram's hashed table rows (token-only, so computed off the training step)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from birkhoff.kernels.reference import engram_hash
from birkhoff.model.config import ModelConfig
from birkhoff.model.engram import hash_layout


@dataclass
class Batch:
    """inputs/targets (B, T) int64. `positions` (B, T) restart at 0 at each document start,
    present when document masking is on (the attention mask and RoPE both follow from them).
    `engram_rows` maps an Engram layer to its table rows (B, T, heads)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    engram_rows: dict[int, torch.Tensor] | None = None

    def split(self, micro_batch_size: int) -> list[Batch]:
        count = self.inputs.shape[0] // micro_batch_size
        return [self._rows(i * micro_batch_size, micro_batch_size) for i in range(count)]

    def to(self, device: torch.device) -> Batch:
        rows = self.engram_rows
        return Batch(
            inputs=self.inputs.to(device),
            targets=self.targets.to(device),
            positions=None if self.positions is None else self.positions.to(device),
            engram_rows=None if rows is None else {k: v.to(device) for k, v in rows.items()},
        )

    def model_kwargs(self) -> dict[str, Any]:
        """The model's optional inputs (positions and Engram rows)."""
        return {"positions": self.positions, "engram_rows": self.engram_rows}

    def _rows(self, start: int, length: int) -> Batch:
        cut = slice(start, start + length)
        rows = self.engram_rows
        return replace(
            self,
            inputs=self.inputs[cut],
            targets=self.targets[cut],
            positions=None if self.positions is None else self.positions[cut],
            engram_rows=None if rows is None else {k: v[cut] for k, v in rows.items()},
        )


def document_positions(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """Position of every token within its document; a document starts after each EOS (and at
    the start of the window, which may be the middle of a document)."""
    seq = inputs.shape[1]
    starts = np.zeros(inputs.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = inputs[:, :-1] == eos_id
    index = np.broadcast_to(np.arange(seq), inputs.shape)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return index - last_start


class EngramHasher:
    """Engram's hash of every Engram layer, exactly as the model computes it (same layout,
    compression table and pad id); needs the model config after its sparse budget is applied."""

    def __init__(self, cfg: ModelConfig, compression: torch.Tensor, pad_id: int) -> None:
        self.compression = compression
        self.pad = int(compression[pad_id])
        self.layouts = {layer: hash_layout(cfg.engram, layer) for layer in cfg.engram.layers}

    def __call__(self, inputs: torch.Tensor) -> dict[int, torch.Tensor]:
        compressed = self.compression[inputs]
        return {
            layer: engram_hash(compressed, multipliers, primes, offsets, self.pad)
            for layer, (multipliers, primes, offsets) in self.layouts.items()
        }


@dataclass(frozen=True)
class BatchBuilder:
    """Windows (N, T + 1) -> Batch, with the features the recipe asks for."""

    eos_id: int
    document_mask: bool
    hasher: EngramHasher | None = None

    def __call__(self, windows: np.ndarray) -> Batch:
        # torch.tensor copies (held-out windows are shared read-only arrays): one copy each.
        inputs = torch.tensor(windows[:, :-1], dtype=torch.int64)
        targets = torch.tensor(windows[:, 1:], dtype=torch.int64)
        batch = Batch(inputs, targets)
        if self.document_mask:
            batch.positions = torch.from_numpy(document_positions(inputs.numpy(), self.eos_id))
        if self.hasher is not None:
            batch.engram_rows = self.hasher(inputs)
        return batch
