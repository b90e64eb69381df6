"""Engram statistics over the whole model, however it is spread over ranks: the mean gate
value of each Engram layer over the training tokens sampled since the last evaluation, and the
share of its table rows looked up so far (since the run started: checkpoints keep the rows seen,
so a resumed run goes on counting). Taken at evaluations: the union of the rows touched is one
all-reduce of a byte per table row and layer, too much to pay every step for large tables."""

from __future__ import annotations

import base64

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from birkhoff.model.config import ModelConfig
from birkhoff.model.engram import Engram, hash_layout
from birkhoff.parallel.distributed import DistributedContext


def engram_stats(
    parts: list[nn.Module], ctx: DistributedContext, cfg: ModelConfig
) -> dict[str, float]:
    """Every rank calls it (pipeline stages hold other layers; data-parallel ranks saw other
    tokens): `engram_gate_mean.L`, `engram_rows_touched.L` per layer L, and both over all."""
    layers = list(cfg.engram.layers)
    if not layers:
        return {}
    mine = _engram_layers(parts)
    sums = torch.zeros(len(layers), 2, dtype=torch.float64, device=ctx.device)
    for i, layer in enumerate(layers):
        if layer in mine:
            gate_sum, count = mine[layer].take_stats()
            sums[i, 0], sums[i, 1] = gate_sum, count
    if ctx.world_size > 1:
        dist.all_reduce(sums)
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


def rows_touched_state(
    parts: list[nn.Module], ctx: DistributedContext, cfg: ModelConfig
) -> dict | None:
    """The rows looked up so far, for a checkpoint (every rank calls it; the same on all):
    per layer, one bit per row (packed, base64)."""
    if not cfg.engram.layers:
        return None
    touched = rows_touched(parts, ctx, cfg).cpu().numpy().astype(bool)
    packed = [base64.b64encode(np.packbits(row).tobytes()).decode() for row in touched]
    return {"layers": list(cfg.engram.layers), "rows": touched.shape[1], "bits": packed}


def load_rows_touched(parts: list[nn.Module], state: dict | None) -> None:
    """Mark the rows a checkpoint's run had looked up in this rank's Engram layers (a
    checkpoint written before birkhoff kept them: nothing to mark)."""
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


def _engram_layers(parts: list[nn.Module]) -> dict[int, Engram]:
    return {m.layer: m for part in parts for m in part.modules() if isinstance(m, Engram)}
