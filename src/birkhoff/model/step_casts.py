"""A module's own weight casts, kept across a step's micro-batches while the trainer asks, and
the weight gradients summed inside them.

Autocast caches the casts of the weights nn.Linear and the like take (until its outermost
context exits), but not a cast the model makes itself (grouped_mm is none of autocast's ops)
nor one of a view of a weight (V4 attention's grouped output projection). Modules that make
such casts hold a `StepCasts`; train/weight_casts.py opens it for a step and closes it after.

While open, a weight's cast is one autograd node that every micro-batch's backward passes
through, and it sums their bf16 gradients itself: the first cast to float32 (read 2 bytes,
write 4), each later one added to that sum in one pass (read 2 and 4, write 4), the total
handed to autograd with the step's last micro-batch, so the weight's gradient is set once.
Autograd's own route casts every micro-batch's gradient (6 bytes) and adds it to the
accumulated one (12). The sums are the same bits: each bf16 gradient is exact in float32 and
the additions come in the same order. Weights that are not leaves (DTensor shards, taken
local), and every weight under a zero-bubble pipeline (its weight passes ask autograd for each
micro-batch's weight gradients), keep autograd's route; compiled blocks (train.compile) cast
inside their graphs on every call, as autocast's cache does not reach into them either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Sum:
    """One weight's gradient over the step's micro-batches so far."""

    total: torch.Tensor | None = None
    count: int = 0


class StepCasts:
    """Casts of a module's weights by dtype: kept while open (a step), else made each call."""

    def __init__(self) -> None:
        self.kept: dict[torch.dtype, tuple[torch.Tensor, ...]] | None = None
        self.micro_batches = 0
        self.summing = False
        self.sums: list[_Sum] = []

    def open(self, micro_batches: int, summing: bool = True) -> None:
        """Keep the casts made from now on for `micro_batches` backwards through them, which
        sum the weights' gradients where `summing` (not where each micro-batch's weight
        gradients are asked of autograd on their own: a zero-bubble pipeline's)."""
        self.kept, self.micro_batches, self.sums = {}, micro_batches, []
        self.summing = summing

    def close(self) -> int:
        """Drop the kept casts; returns how many weights' gradients were not handed on (a
        step that ran fewer backwards than it said: those gradients would be lost)."""
        undelivered = sum(s.count > 0 for s in self.sums)
        self.kept, self.micro_batches, self.sums, self.summing = None, 0, [], False
        return undelivered

    def get(
        self, dtype: torch.dtype, weights: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        """`weights` in `dtype`: the kept casts if this step made them already."""
        kept = self.kept
        # only casts autograd tracks are kept: one made without gradients would cut the
        # weights off from every later micro-batch's backward; a compiled block casts inside
        # its graph (dynamo would break the graph at the kept casts)
        if kept is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return tuple(w.to(dtype) for w in weights)
        if dtype not in kept:
            kept[dtype] = tuple(self._cast(w, dtype) for w in weights)
        return kept[dtype]

    def _cast(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        summable = self.summing and weight.is_leaf and weight.requires_grad
        if weight.dtype == dtype or not summable:
            return weight.to(dtype)
        self.sums.append(_Sum())
        return _SummingCast.apply(weight, dtype, self, self.sums[-1])

    def add(self, into: _Sum, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """One micro-batch's gradient of a weight: the step's total with its last, else None
        (nothing for autograd to accumulate yet)."""
        into.total = grad.to(dtype) if into.total is None else into.total.add_(grad)
        into.count += 1
        if into.count < self.micro_batches:
            return None
        total, into.total, into.count = into.total, None, 0
        return total


class _SummingCast(torch.autograd.Function):
    """weight.to(dtype), whose backward sums the gradients of a step's micro-batches."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, dtype: torch.dtype, owner: StepCasts, into: _Sum):
        ctx.owner, ctx.into, ctx.weight_dtype = owner, into, weight.dtype
        return weight.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.owner.add(ctx.into, grad, ctx.weight_dtype), None, None, None
