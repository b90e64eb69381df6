"""This rank's share of the model. The model is built on the meta device, cut into this rank's
pipeline stages and sharded there (tensor/sequence, expert, Engram rows, FSDP); only then do
the shards get storage, with the initial values every layout shares (model/init.py), or the
weights of `train.init_from` read straight into them. No rank holds more than its share at
any moment, so a model larger than one device can be built."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from birkhoff import kernels
from birkhoff.model import build_model
from birkhoff.model.config import ModelConfig
from birkhoff.model.engram import Engram
from birkhoff.model.transformer import Transformer
from birkhoff.model.v4_attention import V4Attention
from birkhoff.parallel import DistributedContext
from birkhoff.parallel.parallelize import compiled_block_slots, parallelize_chunk
from birkhoff.parallel.pipeline import Carry, PipelineRunner
from birkhoff.parallel.sparse_rows import materialise
from birkhoff.train.init_from import load_initial_weights
from birkhoff.train.recipe import TrainRecipe


@dataclass
class ModelShare:
    cfg: ModelConfig  # the whole model's, sized by its sparse budget
    parts: list[Transformer]  # the whole model, or this rank's pipeline chunks
    pipeline: PipelineRunner | None
    kernels: str  # the kernel backend the model runs (backend.kernels resolved for the device)
    compiled_blocks: int  # blocks whose forward torch.compile runs (train.compile)
    # What must run once a step's gradients are complete (before clipping).
    after_backward: list[Callable[..., None]]


def initialise(part: torch.nn.Module, device: torch.device, engram_host: bool, seed: int) -> None:
    """Give a part built on the meta device (and sharded there) its storage on `device` and
    its initial values, the same for any layout; Engram's and the indexers' statistics made
    before the first forward."""
    materialise(part, device, engram_host)
    part.tie_weights()
    part.init_weights(seed)
    for module in part.modules():
        if isinstance(module, (Engram, V4Attention)):
            module.prepare_stats(device)


def build_share(
    recipe: TrainRecipe,
    ctx: DistributedContext,
    device: torch.device | None,
    compression: torch.Tensor | None,
    pad_id: int,
    micro_batches: int,
) -> ModelShare:
    """Build, cut, shard and materialise this rank's share (see the module docstring);
    `device` None leaves it on the meta device, without values (a dry run)."""
    # `auto` resolved for this device (a dry run, without one: the reference kernels)
    backend = kernels.backend_for(recipe.backend.kernels, device.type if device else None)
    with torch.device("meta"):
        model = build_model(recipe.model, backend, compression, pad_id)
    cfg = model.cfg
    pipeline = None
    if ctx.size("pp") > 1:
        engram_rows = recipe.data.engram_in_loader and cfg.engram.layers
        carry = Carry(
            has_positions=recipe.data.document_mask,
            row_layers=tuple(sorted(cfg.engram.layers)) if engram_rows else (),
            mtp=model.uses_mtp,
        )
        pipeline = PipelineRunner(model, ctx, recipe.parallel, carry, micro_batches)
    parts = pipeline.chunks if pipeline else [model]
    del model  # a pipeline rank keeps only its chunks
    after_backward, compiled_blocks = [], 0
    for part in parts:
        sparse_tables = recipe.optim.engram_update == "sparse"
        compile_backend = recipe.train.compile_backend if recipe.train.compile else None
        after_backward += parallelize_chunk(
            part, ctx, recipe.parallel, sparse_tables, compile_backend=compile_backend
        )
        if recipe.train.compile:
            compiled_blocks += len(compiled_block_slots(part, ctx.size("tp")))
        if device is not None:
            initialise(part, device, recipe.parallel.engram_host, recipe.train.seed)
    if recipe.train.init_from and device is not None:
        load_initial_weights(parts, Path(recipe.train.init_from), announce=ctx.rank == 0)
    return ModelShare(cfg, parts, pipeline, backend, compiled_blocks, after_backward)
