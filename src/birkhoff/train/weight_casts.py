"""bf16 weight copies made once per step instead of once per micro-batch (train.weight_casts).

Under bf16 autocast every micro-batch casts the float32 weights its matmuls use (read 4 bytes,
write 2, per weight) because autocast empties its cast cache when its outermost context exits.
Keeping one autocast context open across a step's micro-batches keeps that cache, so the
forward's casts happen once a step; the casts the model makes itself (model/step_casts.py:
the grouped experts' stacked weights, V4 attention's grouped output projection) are kept as
long and sum their weights' gradients over the micro-batches (one pass each, where autograd
casts each micro-batch's gradient and then accumulates it; not under a zero-bubble pipeline,
whose weight passes take each micro-batch's from autograd). Backward runs with autocast off
inside that context, as outside it before (autocast is for forwards; its state would
otherwise follow the backward into every recomputation and formula). The gradients are the
same bits either way: the same casts of the same weights, summed in the same order.

Not under FSDP: its weights are gathered per micro-batch and freed after, and a cache holding
their casts for the step would hold every gathered unit at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from birkhoff.errors import require
from birkhoff.model.step_casts import StepCasts
from birkhoff.parallel.config import ParallelConfig
from birkhoff.train.config import TrainConfig


def resolve_weight_casts(train: TrainConfig, parallel: ParallelConfig, world_size: int) -> str:
    """per_step or per_micro_batch for this recipe on `world_size` ranks; an explicit per_step
    that cannot apply is an error naming the key (exit 2 before any work)."""
    fsdp = parallel.uses_fsdp(world_size)
    if train.weight_casts == "per_step":
        require(
            train.mixed_precision == "bf16",
            "train.weight_casts",
            "per_step",
            "keeps bf16 copies of the weights: it needs train.mixed_precision=bf16 (or set "
            "train.weight_casts=auto)",
        )
        require(
            not fsdp,
            "train.weight_casts",
            "per_step",
            "cannot apply under FSDP (it gathers the weights per micro-batch): use "
            "train.weight_casts=auto, and parallel.param_dtype=bfloat16 to cast each shard "
            "before its gather",
        )
        return "per_step"
    if train.weight_casts == "auto" and train.mixed_precision == "bf16" and not fsdp:
        return "per_step"
    return "per_micro_batch"


def describe_weight_casts(mode: str, micro_batches: int, mixed_precision: str) -> str:
    """The start-up line: how often the matmuls' bf16 weight copies are made."""
    if mixed_precision != "bf16":
        return "weight casts: none (float32 matmuls: train.mixed_precision=none)"
    if mode == "per_step":
        return f"weight casts: once per step, kept across its {micro_batches} micro-batch(es)"
    return "weight casts: per micro-batch (autocast's own)"


def step_casts_of(parts: list[nn.Module]) -> list[StepCasts]:
    """The `StepCasts` of every module of the model parts (found once, not every step)."""
    owners = [getattr(m, "step_casts", None) for part in parts for m in part.modules()]
    return [casts for casts in owners if isinstance(casts, StepCasts)]


@contextmanager
def casts_kept_for_step(
    kept: list[StepCasts], device_type: str, micro_batches: int, summing: bool = True
) -> Iterator[None]:
    """Within it, bf16 weight casts made by one micro-batch's forward serve the next ones
    (autocast's cache and the model's own, `kept`, whose gradients the casts sum over the
    `micro_batches` backwards); all are dropped on the way out."""
    for casts in kept:
        casts.open(micro_batches, summing)
    failed = True
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
        failed = False
    finally:
        undelivered = sum(casts.close() for casts in kept)
    if undelivered and not failed:
        raise RuntimeError(
            f"{undelivered} weight gradient(s) summed in their casts were not handed to "
            f"autograd: the step ran fewer than its {micro_batches} micro-batch backwards"
        )


def step_context(
    mode: str, kept: list[StepCasts], device_type: str, micro_batches: int, summing: bool = True
):
    """The context a step's `micro_batches` forwards and backwards run in for `mode` (`kept`:
    step_casts_of the model; `summing`: those casts sum their weights' gradients)."""
    if mode != "per_step":
        return nullcontext()
    return casts_kept_for_step(kept, device_type, micro_batches, summing)


def backward_context(mode: str, device_type: str):
    """Backward outside autocast: with per_step casts the step's context is still open."""
    return torch.autocast(device_type, enabled=False) if mode == "per_step" else nullcontext()
