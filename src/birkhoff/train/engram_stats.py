"""Engram statistics over the whole model, however it is spread over ranks: the mean gate
value of each Engram layer over the training tokens sampled since the last evaluation, and the
share of its table rows looked up so far (since the run started). Taken at evaluations: the
union of the rows touched is one all-reduce of a byte per table row and layer, too much to pay
every step for large tables. Checkpoints keep both the rows seen and the gate sums since the
last evaluation, so a resumed run reports what the run that went on would have."""

from __future__ import annotations

import base64

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from birkhoff.model.config import ModelConfig
from birkhoff.model.engram import Engram, hash_layout
from birkhoff.parallel.distributed import DistributedContext


class EngramStats:
    """The trainer's Engram statistics. `carried`: on rank 0 after a resume, the (layers, 2)
    gate sums and counts the checkpointed run had gathered since its last evaluation (summed
    over its ranks, so one rank adds them, whatever the new layout), until they are taken."""

    def __init__(self) -> None:
        self.carried: torch.Tensor | None = None

    def take(
        self, parts: list[nn.Module], ctx: DistributedContext, cfg: ModelConfig
    ) -> dict[str, float]:
        """Every rank calls it (pipeline stages hold other layers; data-parallel ranks saw
        other tokens): `engram_gate_mean.L`, `engram_rows_touched.L` per layer L, and both
        over all layers. The gate sums start again."""
        layers = list(cfg.engram.layers)
        if not layers:
            return {}
        sums = self._gate_sums(parts, ctx, layers, take=True)
        touched = rows_touched(parts, ctx, cfg)
        rows = touched.shape[1]
        counts = touched.sum(1, dtype=torch.float64)
        stats: dict[str, float] = {}
        for i, layer in enumerate(layers):
            if sums[i, 1] > 0:
                stats[f"engram_gate_mean.{layer}"] = (sums[i, 0] / sums[i, 1]).item()
            stats[f"engram_rows_touched.{layer}"] = (counts[i] / rows).item()
        if sums[:, 1].sum() > 0:
            stats["engram_gate_mean"] = (sums[:, 0].sum() / sums[:, 1].sum()).item()
        stats["engram_rows_touched"] = (counts.sum() / (rows * len(layers))).item()
        return stats

    def state(
        self, parts: list[nn.Module], ctx: DistributedContext, cfg: ModelConfig
    ) -> dict | None:
        """For a checkpoint (every rank calls it; the same on all): per layer the rows looked
        up so far, one bit per row (packed, base64), and the gate sum and count since the last
        evaluation."""
        layers = list(cfg.engram.layers)
        if not layers:
            return None
        sums = self._gate_sums(parts, ctx, layers, take=False)
        touched = rows_touched(parts, ctx, cfg).cpu().numpy().astype(bool)
        packed = [base64.b64encode(np.packbits(row).tobytes()).decode() for row in touched]
        return {"layers": layers, "rows": touched.shape[1], "bits": packed,
                "gate_sums": sums.tolist()}  # fmt: skip

    def load(self, parts: list[nn.Module], ctx: DistributedContext, state: dict | None) -> None:
        """Mark the rows the checkpoint's run had looked up in this rank's Engram layers, and
        carry its gate sums (rank 0). A checkpoint written before birkhoff kept them: nothing."""
        if state is None:
            return
        mine = _engram_layers(parts)
        for layer, bits in zip(state["layers"], state["bits"], strict=True):
            if layer not in mine:
                continue
            module = mine[layer]
            packed = np.frombuffer(base64.b64decode(bits), dtype=np.uint8)
            seen = np.unpackbits(packed, count=state["rows"]).astype(bool)
            if module.rows_touched is None:
                module.prepare_stats(next(module.parameters()).device)
            module.rows_touched |= torch.from_numpy(seen).to(module.rows_touched.device)
        if ctx.rank == 0 and "gate_sums" in state:
            self.carried = torch.tensor(state["gate_sums"], dtype=torch.float64)

    def _gate_sums(
        self, parts: list[nn.Module], ctx: DistributedContext, layers: list[int], take: bool
    ) -> torch.Tensor:
        """(layers, 2) gate sums and counts over all ranks (one all-reduce), the carried ones
        included; `take` starts them again."""
        mine = _engram_layers(parts)
        sums = torch.zeros(len(layers), 2, dtype=torch.float64, device=ctx.device)
        for i, layer in enumerate(layers):
            if layer in mine:
                sums[i] = torch.tensor(mine[layer].take_stats(reset=take), dtype=torch.float64)
        if self.carried is not None:
            sums += self.carried.to(ctx.device)
            if take:
                self.carried = None
        if ctx.world_size > 1:
            dist.all_reduce(sums)
        return sums


def rows_touched(parts: list[nn.Module], ctx: DistributedContext, cfg: ModelConfig) -> torch.Tensor:
    """(Engram layers, table rows) uint8: 1 where any rank looked the row up (every rank
    calls it: one all-reduce)."""
    layers = list(cfg.engram.layers)
    rows = int(hash_layout(cfg.engram, layers[0])[1].sum())  # the same primes in every layer
    mine = _engram_layers(parts)
    touched = torch.zeros(len(layers), rows, dtype=torch.uint8, device=ctx.device)
    for i, layer in enumerate(layers):
        seen = mine[layer].rows_touched if layer in mine else None
        if seen is not None:
            touched[i] = seen.to(ctx.device)
    if ctx.world_size > 1:
        dist.all_reduce(touched, op=dist.ReduceOp.MAX)
    return touched


def _engram_layers(parts: list[nn.Module]) -> dict[int, Engram]:
    return {m.layer: m for part in parts for m in part.modules() if isinstance(m, Engram)}
