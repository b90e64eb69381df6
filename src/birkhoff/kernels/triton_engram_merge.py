"""Engram's merge after its projections as five Triton kernels (the `triton` backend's
`engram_merge`): two forward, three backward, where the composition (the gate kernel, liger's
RMSNorm, the convolution's lags, SiLU and the sums in torch) launched about fifty a layer.

Per token t and stream m, with h = streams[t, m], k = keys[t, m], v = value[t], C the width
(kernels/cpu_engram.c computes the same on a CPU, with the formulas written out):
    alpha = sigmoid(signed_sqrt(<h', k'> / sqrt(C))),  h' = h r_h, k' = k r_k (r = 1/rms),
    g = alpha v,  n = g r_g gamma (RMSNorm),  z_t = sum_i w_i n_{t - i d} (causal, lag i),
    out = h + g + silu(z).
g and n are a scalar times v per token and stream (n = alpha r_g gamma v), so neither is
formed: `_stats` keeps five floats per token and stream (alpha, r_g, r_h, r_k, <h', k'>),
`_forward` reads the earlier tokens' values and scalars for z and writes out. Backward,
`_backward_dz` writes dz = dout silu'(z) and the weight w's gradient, `_backward` reads dz at
the later tokens a token's value fed (once: the value's gradient less a row term kept in a
float32 scratch of the value's size between its two passes) and writes the gradients of the
streams, keys and value. The two weights' gradients come from one set of sums per lag i,
P_i = sum over t and m of dz_{t, m} n_{t - i d, m} / gamma (dw_i = gamma P_i, dgamma =
sum_i w_i P_i): each program of ROWS tokens holds its sums in registers a block of channels
at a time and stores them once, and `_finish` adds the programs' in order and writes both
gradients (no atomics, no read-modify-write of memory: the same sums every run).
Float32 inside; out and each gradient in its input's dtype. The tests compare with the
reference under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from birkhoff.kernels import reference
from birkhoff.kernels.registry import register
from birkhoff.kernels.triton_engram import _dot_grad, _gate

BLOCK_C = 128
ROWS = 16  # tokens a backward program sums the weights' gradients over
STATS = 5  # per token and stream: alpha, r_g, r_h, r_k, <h', k'>
_STATS = tl.constexpr(STATS)  # as the kernels read it


@triton.jit
def _stats(h_ptr, k_ptr, v_ptr, stats_ptr, C, eps, N: tl.constexpr, NP: tl.constexpr,
           BLOCK: tl.constexpr):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tokens x n x C passes 2^31
    m = tl.arange(0, NP)
    alpha, _, r_h, r_k, dot = _gate(h_ptr, k_ptr, token, C, eps, N, NP, BLOCK)
    vv = 0.0
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(v_ptr + token * C + cols, mask=cols < C, other=0.0).to(tl.float32)
        vv += tl.sum(v * v)
    r_g = 1.0 / tl.sqrt(alpha * alpha * vv / C + eps)
    at = stats_ptr + (token * N + m) * _STATS
    on = m < N
    tl.store(at, alpha, mask=on)
    tl.store(at + 1, r_g, mask=on)
    tl.store(at + 2, r_h, mask=on)
    tl.store(at + 3, r_k, mask=on)
    tl.store(at + 4, dot, mask=on)


@triton.jit
def _conv(v_ptr, w_ptr, stats_ptr, token, position, cols, C, lags, dilation, N: tl.constexpr,
          NP: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """z / gamma at channels `cols` of a token at `position` in its sequence, (NP, BLOCK)."""
    m = tl.arange(0, NP)
    inside = cols < C
    z = tl.zeros((NP, BLOCK), dtype=tl.float32)
    for i in range(0, tl.minimum(position // dilation + 1, lags)):
        u = token - i * dilation
        st = stats_ptr + (u * N + m) * _STATS
        beta = tl.load(st, mask=m < N, other=0.0) * tl.load(st + 1, mask=m < N, other=0.0)
        v = tl.load(v_ptr + u * C + cols, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + i * C + cols, mask=inside, other=0.0).to(tl.float32)
        z += beta[:, None] * (w * v)[None, :]
    return z


@triton.jit
def _forward(
    h_ptr, v_ptr, gamma_ptr, w_ptr, stats_ptr, out_ptr, length, C, lags, dilation,
    N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    m = tl.arange(0, NP)
    alpha = tl.load(stats_ptr + (token * N + m) * _STATS, mask=m < N, other=0.0)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < C
        z = _conv(v_ptr, w_ptr, stats_ptr, token, token % length, cols, C, lags, dilation, N,
                  NP, BLOCK)  # fmt: skip
        z *= tl.load(gamma_ptr + cols, mask=inside, other=0.0).to(tl.float32)[None, :]
        v = tl.load(v_ptr + token * C + cols, mask=inside, other=0.0).to(tl.float32)
        both = (m < N)[:, None] & inside[None, :]
        where = token * N * C + m[:, None] * C + cols[None, :]
        h = tl.load(h_ptr + where, mask=both, other=0.0).to(tl.float32)
        out = h + alpha[:, None] * v[None, :] + z / (1.0 + tl.exp(-z))
        tl.store(out_ptr + where, out.to(out_ptr.dtype.element_ty), mask=both)


@triton.jit
def _backward_dz(
    g_ptr, v_ptr, gamma_ptr, w_ptr, stats_ptr, dz_ptr, sums_ptr, tokens, length, C, lags,
    dilation, N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    LP: tl.constexpr,
):  # fmt: skip
    """dz of ROWS tokens, and this program's row of sums (lags, C): per lag i the products
    sum_m dz_{t, m} n_{t - i d, m} / gamma over its tokens t, held in registers a block of
    channels at a time and stored once (_finish turns them into both weights' gradients)."""
    program = tl.program_id(0).to(tl.int64)
    m = tl.arange(0, NP)
    lag = tl.arange(0, LP)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < C
        gamma = tl.load(gamma_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        sums = tl.zeros((LP, BLOCK), dtype=tl.float32)
        for r in range(0, ROWS):
            token = tl.minimum(program * ROWS + r, tokens - 1)
            # the channels of a token past the last: none (a scalar mask: the interpreter
            # takes none, so each mask here is a vector)
            live_width = tl.where(program * ROWS + r < tokens, C, 0)
            position = token % length
            both = (m < N)[:, None] & (cols < live_width)[None, :]
            z = _conv(v_ptr, w_ptr, stats_ptr, token, position, cols, C, lags, dilation, N,
                      NP, BLOCK) * gamma[None, :]  # fmt: skip
            where = token * N * C + m[:, None] * C + cols[None, :]
            g = tl.load(g_ptr + where, mask=both, other=0.0).to(tl.float32)  # 0: past the end
            sig = 1.0 / (1.0 + tl.exp(-z))
            dz = g * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + where, dz, mask=both)
            for i in range(0, tl.minimum(position // dilation + 1, lags)):  # lag i read u
                u = token - i * dilation
                st = stats_ptr + (u * N + m) * _STATS
                beta = tl.load(st, mask=m < N, other=0.0) * tl.load(st + 1, mask=m < N, other=0)
                v = tl.load(v_ptr + u * C + cols, mask=inside, other=0.0).to(tl.float32)
                part = tl.sum(dz * beta[:, None], axis=0) * v
                sums += tl.where((lag == i)[:, None], part[None, :], 0.0)
        mine = sums_ptr + (program * lags + lag[:, None]) * C + cols[None, :]
        tl.store(mine, sums, mask=(lag < lags)[:, None] & inside[None, :])


@triton.jit
def _finish(
    sums_ptr, gamma_ptr, w_ptr, dgamma_ptr, dw_ptr, programs, C, lags, LP: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Both weights' gradients from the programs' sums P (lags, C) of a block of channels:
    dw_i = gamma P_i, dgamma = sum_i w_i P_i (the norm's output, gamma times the normalised
    gated value, fed lag i of the convolution)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lag = tl.arange(0, LP)
    inside = cols < C
    both = (lag < lags)[:, None] & inside[None, :]
    total = tl.zeros((LP, BLOCK), dtype=tl.float32)
    for program in range(0, programs):  # in order: the same sums every run
        at = sums_ptr + (program * lags + lag[:, None]).to(tl.int64) * C + cols[None, :]
        total += tl.load(at, mask=both, other=0.0)
    gamma = tl.load(gamma_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + lag[:, None] * C + cols[None, :], mask=both, other=0.0).to(tl.float32)
    dw = total * gamma[None, :]
    tl.store(dw_ptr + lag[:, None] * C + cols[None, :], dw.to(dw_ptr.dtype.element_ty), mask=both)
    dgamma = tl.sum(w * total, axis=0)
    tl.store(dgamma_ptr + cols, dgamma.to(dgamma_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dn(dz_ptr, w_ptr, token, position, cols, length, C, lags, dilation, N: tl.constexpr,
        NP: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """The normalised value's gradient at `cols`: sum over the lags of w_i dz_{t + i d}."""
    m = tl.arange(0, NP)
    inside = cols < C
    both = (m < N)[:, None] & inside[None, :]
    dn = tl.zeros((NP, BLOCK), dtype=tl.float32)
    for i in range(0, tl.minimum((length - 1 - position) // dilation + 1, lags)):
        u = token + i * dilation
        dz = tl.load(dz_ptr + u * N * C + m[:, None] * C + cols[None, :], mask=both, other=0.0)
        w = tl.load(w_ptr + i * C + cols, mask=inside, other=0.0).to(tl.float32)
        dn += w[None, :] * dz
    return dn


@triton.jit
def _backward(
    g_ptr, h_ptr, k_ptr, v_ptr, gamma_ptr, w_ptr, stats_ptr, dz_ptr, dv_part_ptr, dh_ptr, dk_ptr,
    dv_ptr, tokens, length, C, lags, dilation, N: tl.constexpr, NP: tl.constexpr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """The gradients of ROWS tokens' streams, keys and value, two passes a token. The first
    reads dz at the later tokens once (dn) for the row sums (<dout, v>, <dn gamma, v>, <v, v>)
    and keeps the value's gradient without the norm's row term, sum_m alpha (dout + r_g gamma
    dn), in dv_part (float32, the value's shape); the second, knowing the row sums, reads the
    streams and keys for their gradients and writes the value's, dv_part - sum_m alpha coef v:
    dz's lags are read once, not once a pass."""
    program = tl.program_id(0).to(tl.int64)
    m = tl.arange(0, NP)
    on = m < N
    for r in range(0, ROWS):
        token = tl.minimum(program * ROWS + r, tokens - 1)
        # the channels of a token past the last: none (a scalar mask: the interpreter takes
        # none, so each mask below is a vector)
        live_width = tl.where(program * ROWS + r < tokens, C, 0)
        position = token % length
        st = stats_ptr + (token * N + m) * _STATS
        alpha = tl.load(st, mask=on, other=0.0)
        r_g = tl.load(st + 1, mask=on, other=0.0)
        r_h = tl.load(st + 2, mask=on, other=0.0)
        r_k = tl.load(st + 3, mask=on, other=0.0)
        dot = tl.load(st + 4, mask=on, other=0.0)
        gv = tl.zeros((NP,), dtype=tl.float32)
        uv = tl.zeros((NP,), dtype=tl.float32)
        vv = 0.0
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < C
            v = tl.load(v_ptr + token * C + cols, mask=inside, other=0.0).to(tl.float32)
            gamma = tl.load(gamma_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            where = token * N * C + m[:, None] * C + cols[None, :]
            g = tl.load(g_ptr + where, mask=on[:, None] & inside[None, :], other=0.0)
            g = g.to(tl.float32)
            dn = _dn(dz_ptr, w_ptr, token, position, cols, length, C, lags, dilation, N, NP,
                     BLOCK)  # fmt: skip
            gv += tl.sum(g * v[None, :], axis=1)
            uv += tl.sum(dn * (gamma * v)[None, :], axis=1)
            vv += tl.sum(v * v)
            part = tl.sum(alpha[:, None] * (g + r_g[:, None] * dn * gamma[None, :]), axis=0)
            tl.store(dv_part_ptr + token * C + cols, part, mask=cols < live_width)
        # d_gated = dout + r_g gamma dn - v coef (RMSNorm's backward of g = alpha v)
        coef = alpha * alpha * r_g * r_g * r_g * uv / C
        d_alpha = gv + r_g * uv - coef * vv
        d_dot = _dot_grad(d_alpha, alpha, dot / tl.sqrt(C * 1.0), C)
        share = dot / C
        v_coef = tl.sum(alpha * coef)
        # dv_part's row is read back by other threads of this program than those that
        # stored it wherever the compiler lays the two passes' vectors out differently
        tl.debug_barrier()
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            live = cols < live_width
            v = tl.load(v_ptr + token * C + cols, mask=live, other=0.0).to(tl.float32)
            part = tl.load(dv_part_ptr + token * C + cols, mask=live, other=0.0)
            dv = part - v_coef * v
            tl.store(dv_ptr + token * C + cols, dv.to(dv_ptr.dtype.element_ty), mask=live)
            where = token * N * C + m[:, None] * C + cols[None, :]
            both = on[:, None] & live[None, :]
            g = tl.load(g_ptr + where, mask=both, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + where, mask=both, other=0.0).to(tl.float32) * r_h[:, None]
            k = tl.load(k_ptr + where, mask=both, other=0.0).to(tl.float32) * r_k[:, None]
            dh = g + (d_dot * r_h)[:, None] * (k - h * share[:, None])
            dk = (d_dot * r_k)[:, None] * (h - k * share[:, None])
            tl.store(dh_ptr + where, dh.to(dh_ptr.dtype.element_ty), mask=both)
            tl.store(dk_ptr + where, dk.to(dk_ptr.dtype.element_ty), mask=both)


def _sizes(streams: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(tokens, length, n, n padded to a power of two, C)"""
    seqs, length, n, width = streams.shape
    return seqs * length, length, n, triton.next_power_of_2(n), width


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, streams, keys, value, norm_weight, conv_weight, dilation: int, eps: float):
        streams, keys, value = streams.contiguous(), keys.contiguous(), value.contiguous()
        norm_weight, conv_weight = norm_weight.contiguous(), conv_weight.contiguous()
        tokens, length, n, padded, width = _sizes(streams)
        lags = conv_weight.shape[0]
        stats = torch.empty(
            (*streams.shape[:-1], STATS), dtype=torch.float32, device=streams.device
        )
        out = torch.empty(streams.shape, dtype=streams.dtype, device=streams.device)
        shape = {"N": n, "NP": padded, "BLOCK": BLOCK_C}
        _stats[(tokens,)](streams, keys, value, stats, width, eps, **shape)
        _forward[(tokens,)](
            streams, value, norm_weight, conv_weight, stats, out, length, width, lags, dilation,
            **shape,
        )  # fmt: skip
        alpha = stats[..., 0]
        ctx.mark_non_differentiable(alpha)
        ctx.set_materialize_grads(False)  # alpha takes none: no zeros made for it
        ctx.save_for_backward(streams, keys, value, norm_weight, conv_weight, stats)
        ctx.dilation = dilation
        return out, alpha

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, _d_alpha: None):
        if grad is None:
            return (None,) * 7
        streams, keys, value, norm_weight, conv_weight, stats = ctx.saved_tensors
        grad = grad.contiguous()
        tokens, length, n, padded, width = _sizes(streams)
        lags = conv_weight.shape[0]
        programs = triton.cdiv(tokens, ROWS)
        device = streams.device
        f32 = torch.float32
        dz = torch.empty(streams.shape, dtype=f32, device=device)
        dv_part = torch.empty(value.shape, dtype=f32, device=device)
        sums = torch.empty((programs, lags, width), dtype=f32, device=device)
        d_streams, d_keys, d_value, d_norm, d_conv = (
            torch.empty(t.shape, dtype=t.dtype, device=device)
            for t in (streams, keys, value, norm_weight, conv_weight)
        )
        shape = {"N": n, "NP": padded, "BLOCK": BLOCK_C, "ROWS": ROWS}
        sizes = (tokens, length, width, lags, ctx.dilation)
        padded_lags = triton.next_power_of_2(lags)
        _backward_dz[(programs,)](
            grad, value, norm_weight, conv_weight, stats, dz, sums, *sizes, **shape,
            LP=padded_lags,
        )  # fmt: skip
        _backward[(programs,)](
            grad, streams, keys, value, norm_weight, conv_weight, stats, dz, dv_part, d_streams,
            d_keys, d_value, *sizes, **shape,
        )  # fmt: skip
        _finish[(triton.cdiv(width, BLOCK_C),)](
            sums, norm_weight, conv_weight, d_norm, d_conv, programs, width, lags,
            LP=padded_lags, BLOCK=BLOCK_C,
        )  # fmt: skip
        return d_streams, d_keys, d_value, d_norm, d_conv, None, None


@register("engram_merge", "triton")
def engram_merge(
    table: torch.Tensor,
    indices: torch.Tensor,
    key_weight: torch.Tensor,
    value_weight: torch.Tensor,
    streams: torch.Tensor,
    norm_weight: torch.Tensor,
    conv_weight: torch.Tensor,
    dilation: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's `engram_merge` (same arguments and results): the rows gathered and
    projected by torch, the rest in the kernels above, in float32; out in the streams' dtype."""
    if torch.compiler.is_compiling() or streams.numel() == 0:  # inductor fuses the reference
        return reference.engram_merge(
            table, indices, key_weight, value_weight, streams, norm_weight, conv_weight,
            dilation, eps,
        )  # fmt: skip
    memory, value = reference.engram_memory(table, indices, value_weight)
    keys = F.linear(memory, key_weight).view(streams.shape)
    return _Merge.apply(streams, keys, value, norm_weight, conv_weight, dilation, eps)
