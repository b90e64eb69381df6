"""Aux-loss-free expert balancing: after each optimizer step every MoE router moves its bias
toward the loads of the whole global batch (summed over micro-batches and data-parallel ranks)."""

from __future__ import annotations

import torch
from torch import nn

from birkhoff.model.moe import MoE
from birkhoff.parallel import DistributedContext


@torch.no_grad()
def balance_experts(
    model: nn.Module, ctx: DistributedContext, routed_per_layer: int
) -> dict[str, float]:
    """Update router biases from the global loads; return the load summary for the metrics.

    `routed_per_layer` is tokens x top_k of the global batch: what every MoE layer must have
    routed, so any shortfall is a dropped token (there is no capacity limit, so it must be 0).
    """
    layers = [module for module in model.modules() if isinstance(module, MoE)]
    if not layers:
        return {}
    counts = ctx.all_reduce_sum(torch.stack([layer.tokens_per_expert for layer in layers]))
    for layer, load in zip(layers, counts, strict=True):
        layer.router.update_bias(load)
        layer.tokens_per_expert.zero_()
    loads = counts.double()
    mean = loads.mean(-1)
    most, least = loads.max(-1).values, loads.min(-1).values
    return {
        "moe_load_max_over_mean": (most / mean).max().item(),
        "moe_load_min_over_mean": (least / mean).min().item(),
        # An expert with no tokens counts as 1 token, keeping the ratio finite for the logs.
        "moe_load_max_min_ratio": (most / least.clamp(min=1)).max().item(),
        "moe_dropped_tokens": routed_per_layer * len(layers) - int(counts.sum().item()),
    }
