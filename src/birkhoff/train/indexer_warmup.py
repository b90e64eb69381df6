"""The lightning indexer's dense warm-up (DeepSeek-V3.2 §2.1.1, kept for V4's CSA): for the
first `train.indexer_warmup_steps` steps every CSA layer attends to all its visible compressed
entries, its indexer learns the attention's head-summed distribution over all of them (KL),
and nothing else changes: every other gradient is dropped before clipping (so AdamW skips
those parameters, weight decay included) and the MoE balancing biases stay. The rest of the
model still runs forward and backward (its loss is logged); the step costs what a normal one
does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from birkhoff.model.compression import LightningIndexer
from birkhoff.model.v4_attention import V4Attention


@contextmanager
def dense_indexing(parts: list[nn.Module], warming: bool) -> Iterator[None]:
    """CSA layers attend densely inside the block while `warming` (and are switched back for
    evaluation after it); otherwise nothing is touched."""
    if not warming:
        yield
        return
    _set_dense(parts, True)
    try:
        yield
    finally:
        _set_dense(parts, False)


def _set_dense(parts: list[nn.Module], dense: bool) -> None:
    for part in parts:
        for module in part.modules():
            if isinstance(module, V4Attention) and module.indexer is not None:
                module.dense_indexing = dense


def keep_only_indexer_gradients(parts: list[nn.Module]) -> None:
    """Drop the gradient of every parameter that is not an indexer's."""
    for part in parts:
        indexers = {
            id(param)
            for module in part.modules()
            if isinstance(module, LightningIndexer)
            for param in module.parameters()
        }
        for param in part.parameters():
            if id(param) not in indexers:
                param.grad = None
