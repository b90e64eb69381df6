"""Engram's causal depthwise convolution over time, y_t = sum_i w_i * x_{t - i * dilation},
on (B, T, n, C) with one weight row (C,) per lag.

In eager mode an autograd Function: every lag is added in place into one output (forward) and
one input gradient (backward) over the overlapping time slices, and each lag's weight
gradient is one product and one sum. Differentiated by autograd, the shifted multiply-adds
padded every shifted copy, allocated an output per lag, and their backward zero-filled and
copied a slice per lag (at `tiny` with mHC's four streams, ~4% of a training step). Compiled
code traces the plain expression instead, which inductor fuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _shifts(weight: torch.Tensor, dilation: int, length: int) -> list[tuple[int, int]]:
    """(lag i, its shift i * dilation) for the lags i >= 1 that stay inside the sequence."""
    lags = range(1, min(weight.shape[0], (length - 1) // dilation + 1))
    return [(lag, lag * dilation) for lag in lags]


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        out = x * weight[0]
        for lag, shift in _shifts(weight, dilation, x.shape[1]):
            out[:, shift:].addcmul_(x[:, :-shift], weight[lag])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        shifts = _shifts(weight, ctx.dilation, x.shape[1])
        d_x = d_weight = None
        if need[0]:  # y_t reads x_{t - shift}: x_s gets grad_{s + shift} * w
            d_x = grad * weight[0]
            for lag, shift in shifts:
                d_x[:, :-shift].addcmul_(grad[:, shift:], weight[lag])
            d_x = d_x.to(x.dtype)
        if need[1]:
            d_weight = torch.zeros_like(weight)
            dims = tuple(range(x.dim() - 1))
            d_weight[0] = (grad * x).sum(dims)
            for lag, shift in shifts:
                d_weight[lag] = (grad[:, shift:] * x[:, :-shift]).sum(dims)
        return d_x, d_weight, None


def causal_conv(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """y_t = sum_i weight[i] * x_{t - i * dilation} along dim 1 of x (B, T, ..., C); weight
    (lags, C); lags reaching before the sequence's start add nothing."""
    if not torch.compiler.is_compiling():
        return _CausalConv.apply(x, weight, dilation)
    out = x * weight[0]
    for lag, shift in _shifts(weight, dilation, x.shape[1]):
        pad = (0, 0) * (x.dim() - 2) + (shift, 0)
        out = out + F.pad(x[:, :-shift], pad) * weight[lag]
    return out
