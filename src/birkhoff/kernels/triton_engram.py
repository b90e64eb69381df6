"""Engram's gather-and-gate with the gate as one Triton kernel per direction (the `triton`
backend).

The rows are gathered (an embedding lookup) and projected to the per-stream keys and the
shared value by torch (GEMMs); the gate is fused: per token and stream m,
    alpha_m = sigmoid(signed_sqrt(<RMS(h_m), RMS(k_m)> / sqrt(C))),   out_m = alpha_m v,
where the reference runs two RMSNorms (float32 copies of the keys), a product, a sum, the
signed square root and the sigmoid as separate kernels, each kept for its backward. Here the
forward reads h, k and v once per token (one pass for the three sums, one to write), and the
backward recomputes the norms from h and k (nothing but the inputs is saved) and writes the
gradients of h, k and v in one more pass:
    dv = sum_m alpha_m g_m,   d alpha_m = <g_m, v>,   ds_m = d alpha_m alpha_m (1 - alpha_m)
    / (2 sqrt|s_m|) (0 where |s_m| < 1e-6, the clamp),   with h' = RMS(h), k' = RMS(k),
    dh = ds r_h (k' - h' <h', k'> / C) / sqrt(C),   dk = ds r_k (h' - k' <h', k'> / C) / sqrt(C),
r = 1 / sqrt(mean(x^2) + eps). Float32 inside, each tensor stored in its own dtype; the tests
compare with the reference (kernels/reference.py) under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from birkhoff.kernels.reference import engram_memory
from birkhoff.kernels.registry import register

BLOCK_C = 128
# the reference's signed sqrt clamps |s| here (a finite gradient at 0)
SQRT_FLOOR = tl.constexpr(1e-6)


@triton.jit
def _gate(h_ptr, k_ptr, token, C, eps, N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    """A token's gate statistics over its n streams: alpha, s, r_h, r_k and <h', k'>."""
    m = tl.arange(0, NP)
    hh = tl.zeros((NP,), dtype=tl.float32)
    kk = tl.zeros((NP,), dtype=tl.float32)
    hk = tl.zeros((NP,), dtype=tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        both = (m < N)[:, None] & (cols < C)[None, :]
        where = token * N * C + m[:, None] * C + cols[None, :]
        h = tl.load(h_ptr + where, mask=both, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + where, mask=both, other=0.0).to(tl.float32)
        hh += tl.sum(h * h, axis=1)
        kk += tl.sum(k * k, axis=1)
        hk += tl.sum(h * k, axis=1)
    r_h = 1.0 / tl.sqrt(hh / C + eps)
    r_k = 1.0 / tl.sqrt(kk / C + eps)
    dot = hk * r_h * r_k  # <h', k'>
    s = dot / tl.sqrt(C * 1.0)
    root = tl.sqrt(tl.maximum(tl.abs(s), SQRT_FLOOR))
    signed = tl.where(s > 0, root, tl.where(s < 0, -root, 0.0))
    alpha = 1.0 / (1.0 + tl.exp(-signed))
    return alpha, s, r_h, r_k, dot


@triton.jit
def _dot_grad(d_alpha, alpha, s, C):
    """The gradient of <h', k'> from alpha's, through the sigmoid and the signed square root
    (0 where |s| is clamped)."""
    root = tl.sqrt(tl.maximum(tl.abs(s), SQRT_FLOOR))  # unused where clamped (padding: 0)
    d_s = d_alpha * alpha * (1.0 - alpha) * tl.where(tl.abs(s) >= SQRT_FLOOR, 0.5 / root, 0.0)
    return d_s / tl.sqrt(C * 1.0)


@triton.jit
def _forward(
    h_ptr, k_ptr, v_ptr, out_ptr, C, eps, N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tokens x n x C passes 2^31
    m = tl.arange(0, NP)
    alpha, _, _, _, _ = _gate(h_ptr, k_ptr, token, C, eps, N, NP, BLOCK)
    # the reference multiplies in the value's dtype: alpha rounded to it first
    alpha = alpha.to(v_ptr.dtype.element_ty).to(tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < C
        v = tl.load(v_ptr + token * C + cols, mask=inside, other=0.0).to(tl.float32)
        where = token * N * C + m[:, None] * C + cols[None, :]
        both = (m < N)[:, None] & inside[None, :]
        out = alpha[:, None] * v[None, :]
        tl.store(out_ptr + where, out.to(out_ptr.dtype.element_ty), mask=both)


@triton.jit
def _backward(
    h_ptr, k_ptr, v_ptr, g_ptr, dh_ptr, dk_ptr, dv_ptr, C, eps,
    N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tokens x n x C passes 2^31
    m = tl.arange(0, NP)
    on = m < N
    alpha, s, r_h, r_k, dot = _gate(h_ptr, k_ptr, token, C, eps, N, NP, BLOCK)
    d_alpha = tl.zeros((NP,), dtype=tl.float32)
    for start in range(0, C, BLOCK):  # <g_m, v>
        cols = start + tl.arange(0, BLOCK)
        inside = cols < C
        v = tl.load(v_ptr + token * C + cols, mask=inside, other=0.0).to(tl.float32)
        where = token * N * C + m[:, None] * C + cols[None, :]
        g = tl.load(g_ptr + where, mask=on[:, None] & inside[None, :], other=0.0)
        d_alpha += tl.sum(g.to(tl.float32) * v[None, :], axis=1)
    d_dot = _dot_grad(d_alpha, alpha, s, C)
    alpha_v = alpha.to(v_ptr.dtype.element_ty).to(tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < C
        both = on[:, None] & inside[None, :]
        where = token * N * C + m[:, None] * C + cols[None, :]
        h = tl.load(h_ptr + where, mask=both, other=0.0).to(tl.float32) * r_h[:, None]
        k = tl.load(k_ptr + where, mask=both, other=0.0).to(tl.float32) * r_k[:, None]
        g = tl.load(g_ptr + where, mask=both, other=0.0).to(tl.float32)
        dv = tl.sum(alpha_v[:, None] * g, axis=0)
        tl.store(dv_ptr + token * C + cols, dv.to(dv_ptr.dtype.element_ty), mask=inside)
        dh = (d_dot * r_h)[:, None] * (k - h * (dot / C)[:, None])
        dk = (d_dot * r_k)[:, None] * (h - k * (dot / C)[:, None])
        tl.store(dh_ptr + where, dh.to(dh_ptr.dtype.element_ty), mask=both)
        tl.store(dk_ptr + where, dk.to(dk_ptr.dtype.element_ty), mask=both)


def _shape(streams: torch.Tensor) -> tuple[int, int, int, int]:
    n, c = streams.shape[-2], streams.shape[-1]
    return streams.numel() // (n * c), n, triton.next_power_of_2(n), c


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, streams, keys, value, eps: float) -> torch.Tensor:
        streams, keys, value = streams.contiguous(), keys.contiguous(), value.contiguous()
        tokens, n, padded, c = _shape(streams)
        out = value.new_empty(streams.shape)
        _forward[(tokens,)](streams, keys, value, out, c, eps, N=n, NP=padded, BLOCK=BLOCK_C)
        ctx.eps = eps
        ctx.save_for_backward(streams, keys, value)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        streams, keys, value = ctx.saved_tensors
        tokens, n, padded, c = _shape(streams)
        d_streams, d_keys, d_value = map(torch.empty_like, (streams, keys, value))
        _backward[(tokens,)](
            streams, keys, value, grad.contiguous(), d_streams, d_keys, d_value, c, ctx.eps,
            N=n, NP=padded, BLOCK=BLOCK_C,
        )  # fmt: skip
        return d_streams, d_keys, d_value, None


@register("engram_gather_gate", "triton")
def engram_gather_gate(
    table: torch.Tensor,
    indices: torch.Tensor,
    key_weight: torch.Tensor,
    value_weight: torch.Tensor,
    streams: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """table (rows, d), indices (B, T, H), key_weight (n C, H d), value_weight (C, H d),
    streams (B, T, n, C) -> alpha_m W_V e, (B, T, n, C) in the value's dtype."""
    memory, value = engram_memory(table, indices, value_weight)
    keys = F.linear(memory, key_weight).unflatten(-1, streams.shape[-2:])
    return _Gate.apply(streams, keys, value, eps)
