"""Activation checkpointing per block: `full` recomputes the whole block in backward;
`selective` keeps the outputs of the expensive ops (matmuls, attention, grouped GEMMs and
collectives) and recomputes the cheap elementwise rest (norms, activations, mHC mixing)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

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
}
if hasattr(_aten, "_grouped_mm"):
    SAVED_OPS.add(_aten._grouped_mm.default)


def _keep_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(slots: list[tuple[nn.Module, str]], mode: str) -> None:
    """Wrap the block at every (parent, attribute) slot in place; mode none does nothing."""
    if mode == "none":
        return
    options = {"preserve_rng_state": False}  # the blocks draw no random numbers
    if mode == "selective":
        options["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_expensive)
    for parent, name in slots:
        setattr(parent, name, checkpoint_wrapper(getattr(parent, name), **options))
