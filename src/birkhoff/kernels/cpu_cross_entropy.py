"""The head's cross-entropy on a CPU (the `cpu` backend's `linear_cross_entropy`;
kernels/cpu_cross_entropy.c): the reference's chunked op (kernels/linear_cross_entropy.py),
its matmuls unchanged, with each chunk's softmax, loss and logit gradient computed a row at a
time while the row is in cache, where the reference passes over the chunk's (tokens, vocab)
logits six times (max, subtraction, exp, sum, two divisions). At `tiny`'s 1,536 x 4,096
logits those passes are the op's cost beside its three matmuls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from birkhoff.kernels.cpu_library import (
    DTYPES,
    call,
    check,
    check_inputs,
    kernel_op,
)
from birkhoff.kernels.linear_cross_entropy import chunked_linear_cross_entropy
from birkhoff.kernels.registry import CPU, register


@kernel_op("cpu_cross_entropy_rows", mutates_args=("logits",))
def cross_entropy_rows_op(logits: Tensor, targets: Tensor, count: int, want_grad: bool) -> Tensor:
    """Per row of logits (M, V) the cross-entropy at targets (M,) int64, (M,); with
    `want_grad` the logits are overwritten by their gradient (softmax - one-hot) / count."""
    check_inputs(logits)
    check(logits.dim() == 2, lambda: f"the cpu cross-entropy takes rows (M, V), got {logits.shape}")
    rows, vocab = logits.shape
    check(
        targets.dtype == torch.int64 and targets.shape == (rows,) and targets.is_contiguous(),
        lambda: (
            f"the cpu cross-entropy takes {rows} int64 targets, got {targets.dtype} "
            f"{tuple(targets.shape)}"
        ),
    )
    if rows:
        low, high = targets.aminmax()
        check(low >= 0 and high < vocab, lambda: f"targets outside the vocabulary of {vocab}")
    losses = logits.new_empty(rows)
    call("cross_entropy_rows", logits, targets, losses, rows, vocab, count, int(want_grad))
    return losses


@cross_entropy_rows_op.register_fake
def _(logits: Tensor, targets: Tensor, count: int, want_grad: bool) -> Tensor:
    return logits.new_empty(logits.shape[0])


def cross_entropy_rows(
    logits: Tensor, targets: Tensor, count: int, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """kernels/linear_cross_entropy.py's softmax_cross_entropy_rows, in C (float32 logits:
    the op's float32 copy of them, which the registry's dtypes guarantee)."""
    op = cross_entropy_rows_op if torch.compiler.is_compiling() else cross_entropy_rows_op.body
    losses = op(logits, targets.contiguous(), count, want_grad)
    return losses.sum(), (logits if want_grad else None)


linear_cross_entropy = register("linear_cross_entropy", CPU, dtypes=DTYPES)(
    chunked_linear_cross_entropy(cross_entropy_rows)
)
