"""Tensor parallelism with DTensor: every block's plan (Block.tensor_parallel_plan) applied
over the `tp` mesh dimension, Megatron style (column-parallel then row-parallel, inputs and
outputs replicated). MTP depths are blocks too and get the same plan."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from birkhoff.model.transformer import Block

STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    for block in model.modules():
        if isinstance(block, Block):
            plan = {name: STYLES[role]() for name, role in block.tensor_parallel_plan().items()}
            parallelize_module(block, tp_mesh, plan)
