"""Aux-loss-free expert balancing: after each optimizer step every MoE router moves its bias
toward the loads of the whole global batch (summed over micro-batches and data-parallel ranks,
and over tp ranks when sequence parallelism gave each a slice of the sequence)."""

from __future__ import annotations

import torch
from torch import nn

from birkhoff.model.moe import MoE
from birkhoff.parallel import DistributedContext


@torch.no_grad()
def balance_experts(
    parts: list[nn.Module],
    ctx: DistributedContext,
    routed_per_layer: int,
    apply: bool = True,
    sequences_per_step: int = 0,
    move_biases: bool = True,
) -> dict[str, float]:
    """Update router biases from the global loads; return the load summary for the metrics.

    `parts` are this rank's model chunks (pipeline stages hold different layers, so the
    summary is reduced over pp). `routed_per_layer` is tokens x top_k of the global batch:
    what every main MoE layer must have routed; an MTP depth's layer sees `skipped_positions`
    fewer positions of each of the `sequences_per_step` sequences. There is no capacity limit,
    so no token can be dropped: a layer that routed another number is a bug, and fails the step.
    `apply=False` (a skipped step) only clears the loads; `move_biases=False` (the biases'
    frozen last phase) reports the loads without moving the biases.
    """
    layers = [m for part in parts for m in part.modules() if isinstance(m, MoE)]
    if not apply:
        for layer in layers:
            layer.tokens_per_expert.zero_()
        return {}
    if not layers and ctx.size("pp") == 1:
        return {}
    worst = torch.full((3,), float("-inf"), dtype=torch.float64)
    if layers:
        counts = ctx.all_reduce_sum(torch.stack([layer.tokens_per_expert for layer in layers]))
        split = torch.tensor([layer.sequence_parts > 1 for layer in layers])
        if split.any():  # sequence parallelism: each tp rank routed a slice (MTP's: all of it)
            counts = torch.where(split[:, None], ctx.all_reduce_sum(counts, "tp"), counts)
        expected = [
            routed_per_layer - sequences_per_step * layer.skipped_positions * layer.cfg.top_k
            for layer in layers
        ]
        _check_every_token_routed(counts, expected)
        for layer, load in zip(layers, counts, strict=True):
            if move_biases:
                layer.router.update_bias(load)
            layer.tokens_per_expert.zero_()
        worst = _load_summary(counts.double().cpu())
    worst = ctx.all_reduce_max(worst, "pp")
    if not torch.isfinite(worst[0]):
        return {}
    return {
        "moe_load_max_over_mean": worst[0].item(),
        "moe_load_min_over_mean": -worst[1].item(),
        "moe_load_max_min_ratio": worst[2].item(),
    }


def _check_every_token_routed(counts: torch.Tensor, expected: list[int]) -> None:
    routed = counts.sum(-1).tolist()
    for index, (total, wanted) in enumerate(zip(routed, expected, strict=True)):
        if total != wanted:
            raise RuntimeError(
                f"MoE layer {index} of this rank routed {int(total)} token slots in the step, "
                f"not {wanted} (tokens x top_k of the global batch): routing lost or "
                "duplicated tokens"
            )


def _load_summary(loads: torch.Tensor) -> torch.Tensor:
    """(worst max/mean, -(worst min/mean), worst max/min) over layers: all maximised, so
    pipeline stages combine them with one max-reduction."""
    mean = loads.mean(-1)
    most, least = loads.max(-1).values, loads.min(-1).values
    # An expert with no tokens counts as 1 token, keeping the ratio finite for the logs.
    return torch.stack(
        (
            (most / mean).max(),
            -(least / mean).min(),
            (most / least.clamp(min=1)).max(),
        )
    )
