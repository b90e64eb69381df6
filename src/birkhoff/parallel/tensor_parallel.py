"""Tensor parallelism with DTensor: every block's plan (Block.tensor_parallel_plan) applied
over the `tp` mesh dimension, Megatron style (column-parallel then row-parallel). Without
sequence parallelism a sublayer's input and output are whole on every tp rank; with it, the
main blocks' residual is split along the sequence (see sequence_parallel.py). MTP depths are
blocks too and get the plain plan: they run on the whole sequence, after the head's gather.
V4 attention splits its query heads, output groups and indexer heads; its KV entry and
compressors stay whole, and the sums over heads are completed over the tp group."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from birkhoff.model.transformer import Block
from birkhoff.model.v4_attention import V4Attention
from birkhoff.parallel.sequence_parallel import SEQUENCE_DIM, SequenceLayout, WholeSequence

TOKEN_DIM = 0  # of the flattened (B * T, C) tokens the shared experts see

STYLES: dict[str, Callable[[], ParallelStyle]] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "rowwise_seq": lambda: RowwiseParallel(output_layouts=Shard(SEQUENCE_DIM)),
    "rowwise_tokens": lambda: RowwiseParallel(output_layouts=Shard(TOKEN_DIM)),
    "gather_seq": lambda: SequenceLayout("input", "whole", SEQUENCE_DIM, local=False),
    "gather_seq_local": lambda: SequenceLayout("input", "whole", SEQUENCE_DIM),
    "gather_tokens": lambda: SequenceLayout("input", "whole", TOKEN_DIM, local=False),
    "whole_seq": WholeSequence,
}


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False
) -> None:
    """Split every block of `model` (a whole model or a pipeline chunk) over `tp_mesh`."""
    main = list(model.blocks.values()) if model.blocks is not None else []
    for block in model.modules():
        if isinstance(block, Block):
            roles = block.tensor_parallel_plan(sequence_parallel and block in main)
            parallelize_module(block, tp_mesh, {name: STYLES[r]() for name, r in roles.items()})
            if isinstance(block.attention, V4Attention):
                _split_v4_heads(block.attention, tp_mesh)


def _split_v4_heads(attention: V4Attention, tp_mesh: DeviceMesh) -> None:
    """The parts of V4 attention no linear layer holds: the per-head sinks split like the
    heads, and the group over which the heads' sums are completed (model/group_sums.py)."""
    sinks = distribute_tensor(attention.sinks.data, tp_mesh, [Shard(0)])
    attention.sinks = nn.Parameter(sinks, requires_grad=attention.sinks.requires_grad)
    attention.head_group = tp_mesh.get_group()
    if attention.indexer is not None:
        attention.indexer.head_group = attention.head_group
