"""mHC residual statistics of the whole model when its layers are spread over pipeline stages:
the worst deviation is a max over stages, the composite mapping a product in stage order."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from birkhoff.model.mhc import (
    composite_mapping,
    hyper_connections,
    stats_of,
    take_deviation,
)
from birkhoff.model.mhc import (
    residual_stats as model_residual_stats,
)
from birkhoff.parallel.distributed import DistributedContext


def residual_stats(parts: list[nn.Module], ctx: DistributedContext) -> dict[str, float]:
    """`parts` are this rank's pipeline chunks in stage order (r, r + pp, ...)."""
    pp = ctx.size("pp")
    if pp == 1:
        return model_residual_stats(parts[0])
    per_part = [hyper_connections(part) for part in parts]
    if not per_part[0] or per_part[0][0].last_h_res is None:
        return {}
    deviation = take_deviation([layer for layers in per_part for layer in layers])
    deviation = ctx.all_reduce_max(deviation, "pp")
    composite = None
    for layers in per_part:  # chunk v of every rank is stage v * pp + rank
        local = composite_mapping(layers)
        stages = [torch.empty_like(local) for _ in range(pp)]
        dist.all_gather(stages, local, group=ctx.group("pp"))
        for stage in stages:
            composite = stage if composite is None else stage @ composite
    return stats_of(deviation, composite)
