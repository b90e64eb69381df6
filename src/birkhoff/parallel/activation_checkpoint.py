"""Activation checkpointing per block: `full` recomputes the whole block in backward;
`selective` keeps the outputs of the expensive ops (matmuls, attention, grouped GEMMs and
collectives) and recomputes the cheap elementwise rest (norms, activations, mHC mixing)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import (
    CheckpointPolicy,
    _CachedTorchDispatchMode,
    _CachingTorchDispatchMode,
    create_selective_checkpoint_contexts,
)

# Prefix checkpoint_wrapper puts into parameter names; state dicts strip it.
WRAPPED_PREFIX = "_checkpoint_wrapped_module."

_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.all_to_all_single.default,
    torch.ops._c10d_functional.all_reduce.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,  # sequence parallelism
}
if hasattr(_aten, "_grouped_mm"):
    SAVED_OPS.add(_aten._grouped_mm.default)


# FSDP2 units inside a checkpointed block (the routed experts under ep) open profiler ranges in
# forward that recompute does not repeat one for one, and selective checkpointing would look
# each call up in its cache and fail. The ranges compute nothing: both modes just run them.
PROFILER_OPS = {
    torch.ops.profiler._record_function_enter_new.default,
    torch.ops.profiler._record_function_exit._RecordFunction,
}


class _RunsProfilerRanges:
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PROFILER_OPS:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


class _SavingMode(_RunsProfilerRanges, _CachingTorchDispatchMode):
    pass


class _RecomputingMode(_RunsProfilerRanges, _CachedTorchDispatchMode):
    pass


def _selective_contexts():
    """torch's selective-checkpoint modes, with profiler ranges left out of their cache."""
    saving, recomputing = create_selective_checkpoint_contexts(_keep_expensive)
    saving.__class__, recomputing.__class__ = _SavingMode, _RecomputingMode
    return saving, recomputing


def _keep_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(slots: list[tuple[nn.Module, str]], mode: str) -> None:
    """Wrap the block at every (parent, attribute) slot in place; mode none does nothing."""
    if mode == "none":
        return
    options = {"preserve_rng_state": False}  # the blocks draw no random numbers
    if mode == "selective":
        options["context_fn"] = _selective_contexts
    for parent, name in slots:
        setattr(parent, name, checkpoint_wrapper(getattr(parent, name), **options))
