"""RMSNorm and V4's clamped SwiGLU as C kernels on a CPU (the `cpu` backend's `rms_norm` and
`swiglu`; kernels/cpu_rows.c): one pass over each row forward (the norm, the scale and the
weight together) and one backward (the rows' gradient, and the weight's summed per thread),
where the reference's written-out backward (kernels/row_functions.py) still passes over the
rows once per product and sum; SwiGLU one pass each way, where the reference's clamp, SiLU and
product pass once each and their gradients' masks and products again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

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
from birkhoff.kernels.rotation import fused_tables


def _check_rows(x: Tensor, weight: Tensor) -> None:
    check_inputs(x, weight)
    check(x.dim() == 2, lambda: f"the cpu rms_norm takes rows (M, C), got {x.shape}")
    check_shapes((weight, x.shape[1:]))


@kernel_op("cpu_rms_norm")
def rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x r w, r) for rows x (M, C), weight (C,), r = (mean(x^2) + eps)^(-1/2) per row (M,);
    r is what the backward keeps (no gradient flows through it)."""
    _check_rows(x, weight)
    out, inv = torch.empty_like(x), x.new_empty(x.shape[0])
    call("rms_norm_forward", x, weight, out, inv, *x.shape, eps)
    return out, inv


@rms_norm_op.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[0])


@kernel_op("cpu_rms_norm_backward")
def rms_norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor, inv: Tensor, need_x: bool, need_weight: bool
) -> tuple[Tensor, Tensor]:
    """The gradients of x and the weight (each empty where not needed)."""
    _check_rows(x, weight)
    check_inputs(grad, inv)
    check_shapes((grad, x.shape), (inv, x.shape[:1]))
    d_x = torch.empty_like(x) if need_x else x.new_empty(0)
    d_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    call(
        "rms_norm_backward", grad, x, weight, inv, d_x if need_x else None,
        d_weight if need_weight else None, *x.shape,
    )  # fmt: skip
    return d_x, d_weight


@rms_norm_backward.register_fake
def _(grad, x, weight, inv, need_x: bool, need_weight: bool) -> tuple[Tensor, Tensor]:
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
    )


def _save(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])


def _grads(backward: Callable) -> Callable:
    """The op's backward through `backward`: the backward op (registered) or its body (eager);
    so for every op below."""

    def grads(ctx, grad: Tensor, _d_inv):
        x, weight, inv = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        d_x, d_weight = backward(grad.contiguous(), x, weight, inv, need_x, need_weight)
        return (d_x if need_x else None), (d_weight if need_weight else None), None

    return grads


_rms_norm = autograd_paths("RMSNorm", rms_norm_op, _save, _grads, rms_norm_backward)


@register("rms_norm", CPU, dtypes=DTYPES)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference's `rms_norm`: computed in float32, returned in x's dtype."""
    with torch.autocast("cpu", enabled=False):
        rows = float32_contiguous(x.reshape(-1, x.shape[-1]))
        out, _ = _rms_norm(rows, float32_contiguous(weight), eps)
    return out.view(x.shape).to(x.dtype)


def _limit_args(limit: float | None) -> tuple[float, int]:
    return (0.0, 0) if limit is None else (float(limit), 1)


@kernel_op("cpu_swiglu")
def swiglu_op(gate: Tensor, up: Tensor, limit: float | None) -> Tensor:
    """silu(min(gate, limit)) clamp(up, -limit, limit) (no clamp where limit is None)."""
    check_inputs(gate, up)
    check_shapes((up, gate.shape))
    out = torch.empty_like(gate)
    call("swiglu_forward", gate, up, out, gate.numel(), *_limit_args(limit))
    return out


@swiglu_op.register_fake
def _(gate: Tensor, up: Tensor, limit: float | None) -> Tensor:
    return torch.empty_like(gate)


@kernel_op("cpu_swiglu_backward")
def swiglu_backward(
    grad: Tensor, gate: Tensor, up: Tensor, limit: float | None
) -> tuple[Tensor, Tensor]:
    """The gradients of gate and up (the clamp's: none past the limit, as torch's clamp)."""
    check_inputs(grad, gate, up)
    check_shapes((up, gate.shape), (grad, gate.shape))
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    call("swiglu_backward", grad, gate, up, d_gate, d_up, gate.numel(), *_limit_args(limit))
    return d_gate, d_up


@swiglu_backward.register_fake
def _(grad: Tensor, gate: Tensor, up: Tensor, limit: float | None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(gate), torch.empty_like(up)


def _save_swiglu(ctx, inputs: tuple, output: Tensor) -> None:
    gate, up, ctx.limit = inputs
    ctx.save_for_backward(gate, up)


def _swiglu_grads(backward: Callable) -> Callable:
    def grads(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        d_gate, d_up = backward(grad.contiguous(), gate, up, ctx.limit)
        return d_gate, d_up, None

    return grads


_swiglu = autograd_paths("SwiGLU", swiglu_op, _save_swiglu, _swiglu_grads, swiglu_backward)


@register("swiglu", CPU, dtypes=DTYPES)
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """The reference's `swiglu` (V4's clamp first): computed in float32, returned in the
    inputs' promoted dtype (as the reference's product)."""
    with torch.autocast("cpu", enabled=False):
        out = _swiglu(float32_contiguous(gate), float32_contiguous(up), limit)
    return out.to(torch.promote_types(gate.dtype, up.dtype))


def _check_rope(x: Tensor, cos: Tensor, sin: Tensor, groups: int) -> None:
    check_inputs(x, cos, sin)
    check(x.dim() == 2 and cos.dim() == 2, lambda: "the cpu rope takes rows and tables")
    rows, pairs = cos.shape
    check_shapes((sin, cos.shape), (x, (rows * groups, x.shape[1])))
    check(2 * pairs <= x.shape[1], lambda: f"{pairs} pairs in rows of {x.shape[1]}")


@kernel_op("cpu_rope_trailing")
def rope_trailing_op(x: Tensor, cos: Tensor, sin: Tensor, groups: int, inverse: bool) -> Tensor:
    """Rows x (M, width) with their last 2P channels turned pair by pair by the angles of
    cos/sin (M / groups, P): table row r turns x's rows r groups .. (r + 1) groups - 1;
    `inverse` turns back."""
    _check_rope(x, cos, sin, groups)
    rows, pairs = cos.shape
    out = torch.empty_like(x)
    call("rope_trailing", x, cos, sin, out, rows, groups, x.shape[1], pairs, int(inverse))
    return out


@rope_trailing_op.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor, groups: int, inverse: bool) -> Tensor:
    return torch.empty_like(x)


def _save_rope(ctx, inputs: tuple, output: Tensor) -> None:
    _, cos, sin, ctx.groups, ctx.inverse = inputs
    ctx.save_for_backward(cos, sin)


def _rope_grads(turn: Callable) -> Callable:
    def grads(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors  # a turn's gradient is the gradient turned back
        d_x = turn(grad.contiguous(), cos, sin, ctx.groups, not ctx.inverse)
        return d_x, None, None, None, None

    return grads


# the backward turns the gradient back: the op itself
_rope_trailing = autograd_paths(
    "RopeTrailing", rope_trailing_op, _save_rope, _rope_grads, rope_trailing_op
)


@kernel_op("cpu_rope_trailing_normed")
def rope_normed_op(
    x: Tensor, cos: Tensor, sin: Tensor, groups: int, inverse: bool, eps: float
) -> tuple[Tensor, Tensor]:
    """`cpu_rope_trailing` of the rows normalised first (RMSNorm without a weight): (out,
    1/rms per row (M,), what the backward keeps)."""
    _check_rope(x, cos, sin, groups)
    out, inv = torch.empty_like(x), x.new_empty(x.shape[0])
    call(
        "rope_trailing_normed_forward", x, cos, sin, out, inv, cos.shape[0], groups,
        x.shape[1], cos.shape[1], int(inverse), eps,
    )  # fmt: skip
    return out, inv


@rope_normed_op.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor, groups: int, inverse: bool, eps: float):
    return torch.empty_like(x), x.new_empty(x.shape[0])


@kernel_op("cpu_rope_trailing_normed_backward")
def rope_normed_backward(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, inv: Tensor, groups: int, inverse: bool
) -> Tensor:
    """x's gradient: grad turned back, then through the norm."""
    _check_rope(x, cos, sin, groups)
    check_inputs(grad, inv)
    check_shapes((grad, x.shape), (inv, x.shape[:1]))
    d_x = torch.empty_like(x)
    call(
        "rope_trailing_normed_backward", grad, x, cos, sin, inv, d_x, cos.shape[0], groups,
        x.shape[1], cos.shape[1], int(inverse),
    )  # fmt: skip
    return d_x


@rope_normed_backward.register_fake
def _(grad, x, cos, sin, inv, groups: int, inverse: bool) -> Tensor:
    return torch.empty_like(x)


def _save_rope_normed(ctx, inputs: tuple, output: tuple) -> None:
    x, cos, sin, ctx.groups, ctx.inverse, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, cos, sin, output[1])


def _rope_normed_grads(backward: Callable) -> Callable:
    def grads(ctx, grad: Tensor, _d_inv):
        x, cos, sin, inv = ctx.saved_tensors
        d_x = backward(grad.contiguous(), x, cos, sin, inv, ctx.groups, ctx.inverse)
        return d_x, None, None, None, None, None

    return grads


_rope_normed = autograd_paths(
    "RopeTrailingNormed", rope_normed_op, _save_rope_normed, _rope_normed_grads,
    rope_normed_backward,
)  # fmt: skip


@register("rope_trailing", CPU, dtypes=DTYPES)
def rope_trailing(
    x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False, norm_eps: float | None = None
) -> Tensor:
    """The reference's `rope_trailing`: turned (normalised first, with `norm_eps`) in
    float32, returned in x's dtype. Tables that carry a gradient are refused (this kernel
    turns x only)."""
    cos_rows, sin_rows, groups = fused_tables(x, cos, sin, "cpu")
    with torch.autocast("cpu", enabled=False):
        rows = float32_contiguous(x.reshape(-1, x.shape[-1]))
        if norm_eps is None:
            out = _rope_trailing(rows, cos_rows, sin_rows, groups, inverse)
        else:
            out, _ = _rope_normed(rows, cos_rows, sin_rows, groups, inverse, norm_eps)
    return out.view(x.shape).to(x.dtype)
