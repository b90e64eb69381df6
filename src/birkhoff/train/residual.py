"""mHC residual statistics of the whole model however it is spread over ranks: the worst
deviation is a max over every rank (data-parallel ranks and sequence slices saw other tokens,
pipeline stages hold other layers), so every rank takes the same decision on the tolerance;
the composite mapping is a product in stage order."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from birkhoff.model.config import ResidualConfig
from birkhoff.model.mhc import (
    HyperConnection,
    composite_mapping,
    hyper_connections,
    main_path_connections,
    stats_of,
    take_deviation,
)
from birkhoff.parallel.distributed import DistributedContext
from birkhoff.train.failures import ResidualConstraintError


def residual_stats(parts: list[nn.Module], ctx: DistributedContext) -> dict[str, float]:
    """`parts` are this rank's pipeline chunks in stage order (r, r + pp, ...)."""
    per_part = [hyper_connections(part) for part in parts]
    if not per_part[0] or per_part[0][0].last_h_res is None:
        return {}
    deviation = take_deviation([layer for layers in per_part for layer in layers])
    deviation = ctx.all_reduce_max(deviation, None)
    main_path = [main_path_connections(part) for part in parts]
    return stats_of(deviation, _composite_over_stages(main_path, ctx), per_part[0][0].cfg.mode)


def _composite_over_stages(
    per_part: list[list[HyperConnection]], ctx: DistributedContext
) -> torch.Tensor:
    pp = ctx.size("pp")
    if pp == 1:
        return composite_mapping(per_part[0])
    composite = None
    for layers in per_part:  # chunk v of every rank is stage v * pp + rank
        local = composite_mapping(layers)
        stages = [torch.empty_like(local) for _ in range(pp)]
        dist.all_gather(stages, local, group=ctx.group("pp"))
        for stage in stages:
            composite = stage if composite is None else stage @ composite
    return composite


def check_residual_constraint(stats: dict[str, float], cfg: ResidualConfig, step: int) -> None:
    """mHC's H_res must stay (nearly) doubly stochastic: fail step `step` before its update."""
    if cfg.mode != "mhc":
        return
    worst = stats["mhc_col_dev"]  # rows are exact: Sinkhorn's last step normalises them
    if worst > cfg.tolerance:
        raise ResidualConstraintError(
            f"step {step}: an mHC H_res column sum is off by {worst:.3g}, above "
            f"model.residual.tolerance={cfg.tolerance}; raise model.residual.sinkhorn_iters "
            "or lower the learning rate"
        )
