"""Replicated data parallelism over the mesh's `dp_replicate` dimension."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from birkhoff.parallel.distributed import DistributedContext


def apply_data_parallel(model: nn.Module, ctx: DistributedContext) -> nn.Module:
    """Wrap `model` in DDP over the data-parallel group; unchanged in a single process."""
    if ctx.mesh is None:
        return model
    return DistributedDataParallel(model, process_group=ctx.mesh.get_group("dp_replicate"))
