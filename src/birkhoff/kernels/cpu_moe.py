"""MoE token permutation as C kernels on a CPU (the `cpu` backend's `moe_permute` and
`moe_unpermute`; kernels/cpu_moe.c), laid out as the triton backend's (kernels/triton_moe.py):
the permute copies each token to its k expert slots and its backward sums a token's k rows
through the inverse permutation; the unpermute sums each token's k expert outputs with its gate
weights in one pass, and its backward gives the outputs' and the weights' gradients in another.
The reference writes a weighted copy of all N k rows and index_adds it into zeros; autograd
then scatters each way again. The expert order (a stable sort of the flat expert ids) and the
counts stay in torch. Computed in float32, returned in the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from birkhoff.kernels import reference
from birkhoff.kernels.cpu_gather import check_index
from birkhoff.kernels.cpu_library import (
    DTYPES,
    autograd_paths,
    call,
    check,
    check_inputs,
    check_shapes,
    float32_contiguous,
    kernel_op,
)
from birkhoff.kernels.registry import CPU, register


def _check_permutation(order: Tensor, count: int) -> None:
    """`order` (count,) int64 with every value in [0, count): the kernels index rows by it."""
    check(order.numel() == count, lambda: f"an order of {count} rows, got {order.numel()}")
    check_index(order, count, "order")


def inverse_of(order: Tensor) -> Tensor:
    """slot -> permuted row, the inverse permutation of `order`; refused unless `order` is a
    permutation (every slot then has its row: none is left unset)."""
    inverse = torch.full_like(order, -1)
    inverse.scatter_(0, order, torch.arange(order.numel(), dtype=order.dtype))
    check(order.numel() == 0 or bool(inverse.min() >= 0), lambda: "order is not a permutation")
    return inverse


@kernel_op("cpu_moe_permute")
def permute_op(tokens: Tensor, order: Tensor, top_k: int) -> Tensor:
    """rows[r] = tokens[order[r] // top_k]: tokens (N, C), order (N k,) -> (N k, C)."""
    check_inputs(tokens)
    _check_permutation(order, tokens.shape[0] * top_k)
    rows = tokens.new_empty(order.numel(), tokens.shape[1])
    call("gather_rows", tokens, order, rows, order.numel(), top_k, tokens.shape[1])
    return rows


@permute_op.register_fake
def _(tokens: Tensor, order: Tensor, top_k: int) -> Tensor:
    return tokens.new_empty(order.numel(), tokens.shape[1])


@kernel_op("cpu_moe_permute_backward")
def permute_backward(grad: Tensor, order: Tensor, top_k: int) -> Tensor:
    """d tokens[t] = sum_j grad[inverse[t k + j]] with the inverse of order: (N k, C) ->
    (N, C)."""
    check_inputs(grad)
    _check_permutation(order, grad.shape[0])
    inverse = inverse_of(order)
    tokens = grad.shape[0] // top_k
    d_tokens = grad.new_empty(tokens, grad.shape[1])
    call("moe_weighted_sum", grad, inverse, None, d_tokens, tokens, top_k, grad.shape[1])
    return d_tokens


@permute_backward.register_fake
def _(grad: Tensor, order: Tensor, top_k: int) -> Tensor:
    return grad.new_empty(grad.shape[0] // top_k, grad.shape[1])


def _save_permute(ctx, inputs: tuple, output: Tensor) -> None:
    _, order, ctx.top_k = inputs
    ctx.save_for_backward(order)


def _permute_grads(backward: Callable) -> Callable:
    """The op's backward through `backward`: the backward op (registered) or its body (eager)."""

    def grads(ctx, grad: Tensor):
        (order,) = ctx.saved_tensors
        return backward(float32_contiguous(grad), order, ctx.top_k), None, None

    return grads


@kernel_op("cpu_moe_unpermute")
def unpermute_op(rows: Tensor, order: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(out (N, C), the inverse of order): out[t] = sum_j weights[t, j] rows[inverse[t k + j]]
    for rows (N k, C) and gate weights (N, k); the inverse is what the backward reads by."""
    check_inputs(rows, weights)
    check(weights.dim() == 2, lambda: f"gate weights (N, k), got {tuple(weights.shape)}")
    tokens, k = weights.shape
    check_shapes((rows, (tokens * k, rows.shape[-1])))
    _check_permutation(order, tokens * k)
    inverse = inverse_of(order)
    out = rows.new_empty(tokens, rows.shape[1])
    call("moe_weighted_sum", rows, inverse, weights, out, tokens, k, rows.shape[1])
    return out, inverse


@unpermute_op.register_fake
def _(rows: Tensor, order: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    return rows.new_empty(weights.shape[0], rows.shape[1]), torch.empty_like(order)


@kernel_op("cpu_moe_unpermute_backward")
def unpermute_backward(
    grad: Tensor, rows: Tensor, inverse: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor]:
    """The gradients of rows and weights from the output's, grad (N, C)."""
    check_inputs(grad, rows, weights)
    tokens, k = weights.shape
    check_shapes((rows, (tokens * k, grad.shape[-1])), (grad, (tokens, rows.shape[-1])))
    _check_permutation(inverse, tokens * k)
    d_rows, d_weights = torch.empty_like(rows), torch.empty_like(weights)
    call(
        "moe_unpermute_backward", rows, inverse, weights, grad, d_rows, d_weights, tokens, k,
        rows.shape[1],
    )  # fmt: skip
    return d_rows, d_weights


@unpermute_backward.register_fake
def _(grad: Tensor, rows: Tensor, inverse: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(rows), torch.empty_like(weights)


def _save_unpermute(ctx, inputs: tuple, output: tuple) -> None:
    rows, _, weights = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(rows, output[1], weights)


def _unpermute_grads(backward: Callable) -> Callable:
    def grads(ctx, grad: Tensor, _d_inverse):
        rows, inverse, weights = ctx.saved_tensors
        d_rows, d_weights = backward(float32_contiguous(grad), rows, inverse, weights)
        return d_rows, None, d_weights

    return grads


_permute = autograd_paths("MoEPermute", permute_op, _save_permute, _permute_grads, permute_backward)
_unpermute = autograd_paths(
    "MoEUnpermute", unpermute_op, _save_unpermute, _unpermute_grads, unpermute_backward
)


@register("moe_permute", CPU, dtypes=DTYPES)
def moe_permute(
    tokens: Tensor, expert_ids: Tensor, num_experts: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference's `moe_permute`: tokens (N, C), expert_ids (N, k) -> permuted (N k, C) in
    the tokens' dtype, order (N k,), tokens per expert (E,)."""
    flat_ids = expert_ids.flatten()
    order = flat_ids.argsort(stable=True)
    with torch.autocast("cpu", enabled=False):
        rows = _permute(float32_contiguous(tokens), order, expert_ids.shape[1])
    return rows.to(tokens.dtype), order, reference.tokens_per_expert(flat_ids, num_experts)


@register("moe_unpermute", CPU, dtypes=DTYPES)
def moe_unpermute(
    expert_out: Tensor, order: Tensor, gate_weights: Tensor, num_tokens: int
) -> Tensor:
    """The reference's `moe_unpermute`: (N k, C), (N k,), (N, k) -> (N, C) in the expert
    outputs' dtype."""
    if gate_weights.shape[0] != num_tokens:
        raise ValueError(f"gate_weights has {gate_weights.shape[0]} rows for {num_tokens} tokens")
    with torch.autocast("cpu", enabled=False):
        out, _ = _unpermute(
            float32_contiguous(expert_out), order.contiguous(), float32_contiguous(gate_weights)
        )
    return out.to(expert_out.dtype)
