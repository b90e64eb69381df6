"""Rows of a table gathered by index on a CPU, and their gradient added back into a zeroed
table (kernels/cpu_gather.c), for the `cpu` backend's `engram_merge` (Engram's table rows).
torch's index_select and its backward's index_add do per-row work that is their cost at
Engram's 64-byte rows (`tiny`: 24,576 rows from a table of 32,974). The backward adds each
table row's gradients in the order of the indices, as index_add does, whatever the thread
count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from birkhoff.kernels.cpu_library import (
    autograd_paths,
    call,
    check,
    check_inputs,
    kernel_op,
)


def check_index(index: Tensor, rows: int, name: str = "index") -> None:
    """`index` 1-d int64, contiguous, every value a row of a table of `rows` (the C kernels
    index rows by it: the gathers here and MoE's permutation, whose errors call it `name`)."""
    check(
        index.dtype == torch.int64 and index.dim() == 1 and index.is_contiguous(),
        lambda: (
            f"the cpu kernels take a contiguous 1-d int64 {name}, got {index.dtype} "
            f"{tuple(index.shape)}"
        ),
    )
    if index.numel():
        low, high = index.aminmax()
        check(low >= 0 and high < rows, lambda: f"{name} values outside the table's {rows} rows")


@kernel_op("cpu_gather_rows")
def gather_op(table: Tensor, index: Tensor) -> Tensor:
    """table[index]: (R, C), (M,) -> (M, C)."""
    check_inputs(table)
    check(table.dim() == 2, lambda: f"the cpu gather takes a table (R, C), got {table.shape}")
    check_index(index, table.shape[0])
    out = table.new_empty(index.numel(), table.shape[1])
    call("gather_rows", table, index, out, index.numel(), 1, table.shape[1])
    return out


@gather_op.register_fake
def _(table: Tensor, index: Tensor) -> Tensor:
    return table.new_empty(index.numel(), table.shape[1])


@kernel_op("cpu_gather_rows_backward")
def gather_backward(grad: Tensor, index: Tensor, rows: int) -> Tensor:
    """The table's gradient (rows, C): zeros with grad[i] added at index[i]."""
    check_inputs(grad)
    check(grad.dim() == 2 and grad.shape[0] == index.numel(), lambda: "a gradient row per index")
    check_index(index, rows)
    d_table = grad.new_empty(rows, grad.shape[1])
    call("scatter_add_rows", grad, index, d_table, index.numel(), rows, grad.shape[1])
    return d_table


@gather_backward.register_fake
def _(grad: Tensor, index: Tensor, rows: int) -> Tensor:
    return grad.new_empty(rows, grad.shape[1])


def _save(ctx, inputs: tuple, output: Tensor) -> None:
    table, index = inputs
    ctx.rows = table.shape[0]
    ctx.save_for_backward(index)


def _grads(backward: Callable) -> Callable:
    """The op's backward through `backward`: the backward op (registered) or its body (eager)."""

    def grads(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return backward(grad.contiguous(), index, ctx.rows), None

    return grads


gather_rows = autograd_paths("GatherRows", gather_op, _save, _grads, gather_backward)
