"""FSDP2 (`fully_shard`): one unit per block plus the root, over the data-parallel ranks.

With dp_replicate > 1 the mesh is 2-D (replicate x shard): HSDP. Routed experts are sharded
over ep already, so their unit uses the expert-data-parallel ranks (dp_replicate x
dp_shard / ep) and divides gradients by the whole data-parallel size: every rank's tokens
reached them through the all-to-all, and the loss is a mean over all data-parallel ranks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from birkhoff.model.moe import MoE
from birkhoff.parallel.config import ParallelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _mixed_precision(cfg: ParallelConfig) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(
        param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype]
    )


def apply_fsdp(
    model: nn.Module,
    blocks: list[nn.Module],
    mesh: DeviceMesh,
    cfg: ParallelConfig,
    expert_mesh: DeviceMesh | None,
    ignored: set[nn.Parameter],
) -> None:
    """Shard `model` (a whole model or a pipeline chunk) whose blocks are `blocks`; `ignored`
    parameters are sharded already (row-sharded Engram tables)."""
    dp_mesh = mesh["dp_replicate", "dp_shard"]
    settings = {
        "mp_policy": _mixed_precision(cfg),
        "reshard_after_forward": cfg.reshard_after_forward,
        "ignored_params": ignored,
    }
    dp_size = dp_mesh.size()
    for block in blocks:
        if expert_mesh is not None:
            _shard_experts(block, expert_mesh, dp_size, settings)
        fully_shard(block, mesh=dp_mesh, **settings)
    # The root keeps its parameters after forward: backward needs them first.
    fully_shard(model, mesh=dp_mesh, **{**settings, "reshard_after_forward": False})


def _shard_experts(block: nn.Module, expert_mesh: DeviceMesh, dp_size: int, settings) -> None:
    for module in block.modules():
        if isinstance(module, MoE):
            fully_shard(module.experts, mesh=expert_mesh, **settings)
            module.experts.set_gradient_divide_factor(float(dp_size))
            # gloo has no pre-multiplied sum: divide after a plain sum instead. Not with a
            # 1-rank shard group, where torch 2.13 would then divide twice (the 1-rank copy
            # and the post-divide both apply the factor).
            if expert_mesh["dp_shard_mod_ep"].size() > 1:
                module.experts.set_force_sum_reduction_for_comms(True)
