"""Engram statistics over the whole model, however it is spread over ranks: the mean gate
value of each Engram layer over the training tokens sampled since the last evaluation, and the
share of its table rows looked up so far (since this process started training; a resumed run
counts again). Taken at evaluations: the union of the rows touched is one all-reduce of a byte
per table row and layer, too much to pay every step for large tables."""

from __future__ import annotations

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
    rows = int(hash_layout(cfg.engram, layers[0])[1].sum())  # the same primes in every layer
    mine = {m.layer: m for part in parts for m in part.modules() if isinstance(m, Engram)}
    sums = torch.zeros(len(layers), 2, dtype=torch.float64, device=ctx.device)
    touched = torch.zeros(len(layers), rows, dtype=torch.uint8, device=ctx.device)
    for i, layer in enumerate(layers):
        if layer in mine:
            gate_sum, count, seen = mine[layer].take_stats()
            sums[i, 0], sums[i, 1] = gate_sum, count
            if seen is not None:
                touched[i] = seen.to(ctx.device)
    if ctx.world_size > 1:
        dist.all_reduce(sums)
        dist.all_reduce(touched, op=dist.ReduceOp.MAX)
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
