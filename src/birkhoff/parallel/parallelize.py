"""Apply the recipe's layout to a model from outside, in torchtitan's order: tensor parallel
(and sequence parallel), expert parallel, activation checkpointing, torch.compile per block
(train.compile), row-sharded Engram tables
(or tables with row-sparse gradients, kept whole outside FSDP), then FSDP2 / HSDP (or DDP for
pure replication)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from birkhoff.model.engram import Engram, sparse_table_gradients
from birkhoff.model.moe import MoE
from birkhoff.parallel.activation_checkpoint import apply_activation_checkpointing
from birkhoff.parallel.compile import compile_blocks
from birkhoff.parallel.config import ParallelConfig
from birkhoff.parallel.distributed import DistributedContext
from birkhoff.parallel.engram_shard import shard_engram_tables
from birkhoff.parallel.expert_parallel import apply_expert_parallel
from birkhoff.parallel.fsdp import apply_fsdp
from birkhoff.parallel.sequence_parallel import (
    SequenceParallelGradients,
    mark_sequence_bounds,
    split_sequences_in_moe,
)
from birkhoff.parallel.sparse_rows import SparseGradientMean
from birkhoff.parallel.tensor_parallel import apply_tensor_parallel


def parallelize_chunk(
    model: nn.Module,
    ctx: DistributedContext,
    cfg: ParallelConfig,
    sparse_tables: bool = False,
    compile_backend: str | None = None,
) -> list[Callable[..., None]]:
    """Shard one model (or one pipeline chunk) in place; a no-op in a single process except
    activation checkpointing (and compilation). `sparse_tables`: Engram tables take row-sparse
    gradients (optim.engram_update=sparse). `compile_backend`: torch.compile per block with
    that dynamo backend (train.compile), before FSDP. Returns what must run once a step's
    gradients are complete."""
    after_backward = []
    if ctx.size("tp") > 1:
        apply_tensor_parallel(model, ctx.mesh["tp"], cfg.sequence_parallel)
        if cfg.sequence_parallel:
            after_backward.append(apply_sequence_parallel(model, ctx))
    if ctx.size("ep") > 1:
        for module in model.modules():
            if isinstance(module, MoE):
                apply_expert_parallel(module.experts, ctx.mesh["ep"])
    apply_activation_checkpointing(block_slots(model), cfg.activation_checkpoint)
    if compile_backend is not None:
        compile_blocks(compiled_block_slots(model, ctx.size("tp")), compile_backend)
    tables = set()
    if sparse_tables:
        tables = set(sparse_table_gradients(model))
        if ctx.dp_size > 1:
            engrams = [m for m in model.modules() if isinstance(m, Engram)]
            after_backward.append(SparseGradientMean(engrams, ctx))
    elif ctx.mesh is not None and cfg.engram_row_shard:
        tables = set(shard_engram_tables(model, ctx.mesh))
    if ctx.mesh is not None and ctx.dp_size > 1 and not cfg.uses_ddp(ctx.world_size):
        expert_mesh = ctx.mesh["dp_replicate", "dp_shard_mod_ep"] if ctx.size("ep") > 1 else None
        blocks = [getattr(parent, name) for parent, name in block_slots(model)]
        apply_fsdp(model, blocks, ctx.mesh, cfg, expert_mesh, tables)
    return after_backward


def apply_sequence_parallel(model: nn.Module, ctx: DistributedContext) -> SequenceParallelGradients:
    """Split the main blocks' residual along the sequence (after tensor parallelism); returns
    the gradient sum over tp that the parameters left whole then need."""
    blocks = list(model.blocks.values())
    mark_sequence_bounds(blocks, ctx.mesh["tp"])
    for block in blocks:
        split_sequences_in_moe(block, ctx.mesh["tp"])
    return SequenceParallelGradients(blocks, ctx)


def wrap_ddp(model: nn.Module, ctx: DistributedContext, cfg: ParallelConfig) -> nn.Module:
    """DDP over the data-parallel ranks for pure replication; `model` itself otherwise."""
    if ctx.mesh is None or not cfg.uses_ddp(ctx.world_size):
        return model
    sparse = [
        f"{name}.table.weight"
        for name, module in model.named_modules()
        if isinstance(module, Engram) and module.sparse_table_gradient
    ]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sparse)
    return DistributedDataParallel(model, process_group=ctx.group("dp"))


def block_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every transformer block: the main ones (those a pipeline chunk
    holds) and each MTP depth's block."""
    slots = [(model.blocks, name) for name in model.blocks] if model.blocks is not None else []
    slots += [(depth, "block") for depth in (model.mtp or [])]
    return slots


def compiled_block_slots(model: nn.Module, tp: int) -> list[tuple[nn.Module, str]]:
    """The blocks train.compile compiles: all of them, but under tensor parallelism only the
    main ones. torch 2.13 fails to trace an MTP depth's backward under tp (unbounded recursion
    in make_fx's proxies at the attention output's view, with or without sequence
    parallelism), so MTP depths run eagerly there; the count of compiled blocks is printed."""
    slots = block_slots(model)
    return slots if tp == 1 else [slot for slot in slots if slot[0] is model.blocks]
