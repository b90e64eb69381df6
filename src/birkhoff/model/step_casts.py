"""A module's own weight casts, kept across a step's micro-batches while the trainer asks.

Autocast caches the casts of the weights nn.Linear and the like take (until its outermost
context exits), but not a cast the model makes itself (grouped_mm is none of autocast's ops)
nor one of a view of a weight (V4 attention's grouped output projection). Modules that make
such casts hold a `StepCasts`; train/weight_casts.py fills it for a step and empties it after.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StepCasts:
    """The casts by dtype while `kept` is a dict (a step keeps them), else none kept."""

    def __init__(self) -> None:
        self.kept: dict[torch.dtype, tuple[torch.Tensor, ...]] | None = None

    def get(
        self, dtype: torch.dtype, cast: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """`cast()`'s tensors in `dtype`: the kept ones if this step made them already."""
        kept = self.kept
        if kept is not None and dtype in kept:
            return kept[dtype]
        casts = cast()
        # only casts autograd tracks: one made without gradients would cut the weights off
        if kept is not None and torch.is_grad_enabled():
            kept[dtype] = casts
        return casts
