"""Row-wise pieces of the reference ops with their backward written out: RMSNorm, the Engram
gate's similarity of two normalised rows, and the gated value an Engram layer adds to each
residual stream.

Autograd through their composite forms runs several passes over stream-sized tensors for
each of their ops (F.rms_norm has no fused CPU kernel: pow, mean, rsqrt and two products
forward, about a dozen ops backward), and these tensors are the widest of an mHC model:
memory traffic, not arithmetic, is their cost on a CPU. Each backward here reads its inputs
once or twice and writes each gradient once. Compiled code traces the same arithmetic as
plain expressions instead (inductor fuses them and differentiates them itself), so compiled
and eager runs round alike.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(mean(x^2) + eps)^(-1/2) over the last dimension (kept as a size-1 dimension): one
    reduction pass over x (a vector norm), where square-then-mean writes a squared copy first."""
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]
    return torch.rsqrt(mean_square + eps)  # one float per row: out of place (differentiable)


class _RMSNorm(torch.autograd.Function):
    """y = x r w with r = inverse_rms(x). With u = g w: dx = r u - x r^3 <u, x> / C and
    dw = sum over rows of g x r. It keeps x and r (autograd kept x r as well). Without a
    weight, w = 1 (u = g)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        scale = inverse_rms(x, eps)
        ctx.save_for_backward(x, weight, scale)
        out = x * scale
        return out if weight is None else out.mul_(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, scale = ctx.saved_tensors
        d_x = d_weight = None
        if ctx.needs_input_grad[0]:
            weighted = grad if weight is None else grad * weight
            dot = (weighted * x).sum(-1, keepdim=True)
            d_x = x * (dot * scale.pow(3) / -x.shape[-1])
            d_x.addcmul_(weighted, scale)
        if ctx.needs_input_grad[1]:
            d_weight = (grad * x).mul_(scale).flatten(0, -2).sum(0)
        return d_x, d_weight, None


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension with weight (C,) or none, in x's dtype (see
    _RMSNorm)."""
    if torch.compiler.is_compiling():
        normed = x * inverse_rms(x, eps)
        return normed if weight is None else normed * weight
    return _RMSNorm.apply(x, weight, eps)


def rms_normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row of x RMS-normalised without a weight, in float32, returned in x's dtype: V4's
    per-head query norm (`rope_trailing`'s norm_eps, where a backend does not fuse it)."""
    return rms_norm_rows(x.float(), None, eps).to(x.dtype)


class _NormalisedSimilarity(torch.autograd.Function):
    """s = <RMSNorm(h), RMSNorm(k)> / sqrt(C) per row, as <h, k> r_h r_k / sqrt(C) (no
    normalised copy is formed). With a = ds r_h r_k / sqrt(C):
    dh = a (k - <h, k> r_h^2 h / C), dk = a (h - <h, k> r_k^2 k / C)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
        r_h, r_k = inverse_rms(h, eps).squeeze(-1), inverse_rms(k, eps).squeeze(-1)
        dot = (h * k).sum(-1)
        ctx.save_for_backward(h, k, r_h, r_k, dot)
        return dot * r_h * r_k / h.shape[-1] ** 0.5

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        h, k, r_h, r_k, dot = ctx.saved_tensors
        c = h.shape[-1]
        a = grad * r_h * r_k / c**0.5
        d_h = d_k = None
        if ctx.needs_input_grad[0]:
            d_h = h * (a * dot * r_h.square() / -c).unsqueeze(-1)
            d_h.addcmul_(k, a.unsqueeze(-1))
        if ctx.needs_input_grad[1]:
            d_k = k * (a * dot * r_k.square() / -c).unsqueeze(-1)
            d_k.addcmul_(h, a.unsqueeze(-1))
        return d_h, d_k, None


def normalised_similarity(h: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
    """<RMSNorm(h), RMSNorm(k)> / sqrt(C) over the last dimension (no weights): (..., C) ->
    (...)."""
    if torch.compiler.is_compiling():
        scales = (inverse_rms(h, eps) * inverse_rms(k, eps)).squeeze(-1)
        return (h * k).sum(-1) * scales / h.shape[-1] ** 0.5
    return _NormalisedSimilarity.apply(h, k, eps)


class _GatedValue(torch.autograd.Function):
    """out[m, i] = alpha[m, i] value[m] for rows m and streams i: (M, n), (M, C) -> (M, n, C).
    Backward as two batched row-times-matrix products: d_alpha[m] = value[m] g[m]^T and
    d_value[m] = alpha[m] g[m] (autograd's broadcast product summed a stream-sized product
    for each)."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(alpha, value)
        return alpha.unsqueeze(-1) * value.unsqueeze(-2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        alpha, value = ctx.saved_tensors
        d_alpha = d_value = None
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(value.dtype)
            if ctx.needs_input_grad[0]:
                d_alpha = torch.bmm(value.unsqueeze(1), grad.transpose(1, 2)).squeeze(1)
            if ctx.needs_input_grad[1]:
                d_value = torch.bmm(alpha.unsqueeze(1), grad).squeeze(1)
        return d_alpha, d_value


def gated_value(alpha: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """alpha (..., n) times value (..., C) per stream: (..., n, C), in value's dtype."""
    if torch.compiler.is_compiling():
        return alpha.unsqueeze(-1).to(value.dtype) * value.unsqueeze(-2)
    *batch, n = alpha.shape
    rows = _GatedValue.apply(
        alpha.to(value.dtype).reshape(-1, n), value.reshape(-1, value.shape[-1])
    )
    return rows.view(*batch, n, value.shape[-1])
