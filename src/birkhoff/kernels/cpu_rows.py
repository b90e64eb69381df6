"""RMSNorm as a C kernel on a CPU (the `cpu` backend's `rms_norm`; kernels/cpu_rows.c): one
pass over each row forward (the norm, the scale and the weight together) and one backward
(the rows' gradient, and the weight's summed per thread), where the reference's written-out
backward (kernels/row_functions.py) still passes over the rows once per product and sum.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from birkhoff.kernels import reference
from birkhoff.kernels.cpu_library import (
    DTYPES,
    call,
    check_inputs,
    check_shapes,
    float32_contiguous,
)
from birkhoff.kernels.registry import CPU, register


def _check_rows(x: Tensor, weight: Tensor) -> None:
    check_inputs(x, weight)
    torch._check(x.dim() == 2, lambda: f"the cpu rms_norm takes rows (M, C), got {x.shape}")
    check_shapes((weight, x.shape[1:]))


@custom_op("birkhoff::cpu_rms_norm", mutates_args=())
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


@custom_op("birkhoff::cpu_rms_norm_backward", mutates_args=())
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


def _grads(ctx, grad: Tensor, _d_inv):
    x, weight, inv = ctx.saved_tensors
    need_x, need_weight = ctx.needs_input_grad[:2]
    d_x, d_weight = rms_norm_backward(grad.contiguous(), x, weight, inv, need_x, need_weight)
    return (d_x if need_x else None), (d_weight if need_weight else None), None


rms_norm_op.register_autograd(_grads, setup_context=_save)


@register("rms_norm", CPU, dtypes=DTYPES)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference's `rms_norm`: computed in float32, returned in x's dtype."""
    if torch.compiler.is_compiling():
        return reference.rms_norm(x, weight, eps)
    with torch.autocast("cpu", enabled=False):
        rows = float32_contiguous(x.reshape(-1, x.shape[-1]))
        out, _ = rms_norm_op(rows, float32_contiguous(weight), eps)
    return out.view(x.shape).to(x.dtype)
