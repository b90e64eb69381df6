"""mHC's stream read and residual merge as Triton kernels (the `triton` backend), forward and
backward, one program per token.

`mhc_pre` reads the n streams once and writes the layer input (n C in, C out); `mhc_post`
reads the streams and the sublayer output and writes the next streams, the H_res mix and the
H_post update in one pass ((n + 1) C in, n C out), where the reference makes a matmul, a
broadcast product and a sum (and autograd keeps their inputs: the same ones, so the saved
tensors do not change). The backward kernels give every gradient of a token in one pass
too: the streams' and the sublayer output's per channel, the n x n and n mixing weights' as
sums over the channels. Everything is accumulated in float32 and stored in each tensor's
own dtype. The semantics are the reference's (kernels/mhc_reference.py), which the tests
compare against under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from birkhoff.kernels.registry import register

BLOCK_C = 128


@triton.jit
def _tile(token, start, C, N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    """Channels [start, start + BLOCK) of a token: their indices and mask, and the offsets
    and mask of the (streams x channels) tile of a (tokens, N, C) tensor."""
    streams = tl.arange(0, NP)
    cols = start + tl.arange(0, BLOCK)
    inside = cols < C
    where = token * N * C + streams[:, None] * C + cols[None, :]
    return cols, inside, where, (streams < N)[:, None] & inside[None, :]


@triton.jit
def _pre_forward(x_ptr, h_ptr, out_ptr, C, N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tokens x n x C passes 2^31
    streams = tl.arange(0, NP)
    on = streams < N
    h = tl.load(h_ptr + token * N + streams, mask=on, other=0.0).to(tl.float32)
    for start in range(0, C, BLOCK):
        cols, inside, where, both = _tile(token, start, C, N, NP, BLOCK)
        x = tl.load(x_ptr + where, mask=both, other=0.0).to(tl.float32)
        out = tl.sum(h[:, None] * x, axis=0)
        tl.store(out_ptr + token * C + cols, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _pre_backward(
    x_ptr, h_ptr, g_ptr, add_ptr, dx_ptr, dh_ptr, C, N: tl.constexpr, NP: tl.constexpr,
    BLOCK: tl.constexpr, ADD: tl.constexpr,
):  # fmt: skip
    """dx = h g (plus the streams' other gradient at add_ptr, with ADD), dh = <x, g>."""
    token = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tokens x n x C passes 2^31
    streams = tl.arange(0, NP)
    on = streams < N
    h = tl.load(h_ptr + token * N + streams, mask=on, other=0.0).to(tl.float32)
    dh = tl.zeros((NP,), dtype=tl.float32)
    for start in range(0, C, BLOCK):
        cols, inside, where, both = _tile(token, start, C, N, NP, BLOCK)
        x = tl.load(x_ptr + where, mask=both, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + token * C + cols, mask=inside, other=0.0).to(tl.float32)
        dx = h[:, None] * g[None, :]
        if ADD:
            dx += tl.load(add_ptr + where, mask=both, other=0.0).to(tl.float32)
        tl.store(dx_ptr + where, dx.to(dx_ptr.dtype.element_ty), mask=both)
        dh += tl.sum(x * g[None, :], axis=1)
    tl.store(dh_ptr + token * N + streams, dh.to(dh_ptr.dtype.element_ty), mask=on)


@triton.jit
def _mixing(hres_ptr, hpost_ptr, token, N: tl.constexpr, NP: tl.constexpr):
    """A token's n x n H_res and n H_post, in float32 (padded to NP with zeros)."""
    streams = tl.arange(0, NP)
    on = streams < N
    pair = token * N * N + streams[:, None] * N + streams[None, :]
    h_res = tl.load(hres_ptr + pair, mask=on[:, None] & on[None, :], other=0.0)
    h_post = tl.load(hpost_ptr + token * N + streams, mask=on, other=0.0)
    return h_res.to(tl.float32), h_post.to(tl.float32)


@triton.jit
def _post_forward(
    x_ptr, y_ptr, hres_ptr, hpost_ptr, out_ptr, C,
    N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tokens x n x C passes 2^31
    h_res, h_post = _mixing(hres_ptr, hpost_ptr, token, N, NP)
    for start in range(0, C, BLOCK):
        cols, inside, where, both = _tile(token, start, C, N, NP, BLOCK)
        x = tl.load(x_ptr + where, mask=both, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + token * C + cols, mask=inside, other=0.0).to(tl.float32)
        mixed = tl.sum(h_res[:, :, None] * x[None, :, :], axis=1)  # row j: sum_i H[j, i] x_i
        out = mixed + h_post[:, None] * y[None, :]
        tl.store(out_ptr + where, out.to(out_ptr.dtype.element_ty), mask=both)


@triton.jit
def _post_backward(
    x_ptr, y_ptr, hres_ptr, hpost_ptr, g_ptr, dx_ptr, dy_ptr, dhres_ptr, dhpost_ptr, C,
    N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tokens x n x C passes 2^31
    h_res, h_post = _mixing(hres_ptr, hpost_ptr, token, N, NP)
    dh_res = tl.zeros((NP, NP), dtype=tl.float32)
    dh_post = tl.zeros((NP,), dtype=tl.float32)
    for start in range(0, C, BLOCK):
        cols, inside, where, both = _tile(token, start, C, N, NP, BLOCK)
        x = tl.load(x_ptr + where, mask=both, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + where, mask=both, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + token * C + cols, mask=inside, other=0.0).to(tl.float32)
        dx = tl.sum(h_res[:, :, None] * g[:, None, :], axis=0)  # stream i: sum_j H[j, i] g_j
        tl.store(dx_ptr + where, dx.to(dx_ptr.dtype.element_ty), mask=both)
        dy = tl.sum(h_post[:, None] * g, axis=0)
        tl.store(dy_ptr + token * C + cols, dy.to(dy_ptr.dtype.element_ty), mask=inside)
        dh_res += tl.sum(g[:, None, :] * x[None, :, :], axis=2)
        dh_post += tl.sum(g * y[None, :], axis=1)
    streams = tl.arange(0, NP)
    on = streams < N
    pair = token * N * N + streams[:, None] * N + streams[None, :]
    tl.store(
        dhres_ptr + pair, dh_res.to(dhres_ptr.dtype.element_ty), mask=on[:, None] & on[None, :]
    )
    tl.store(dhpost_ptr + token * N + streams, dh_post.to(dhpost_ptr.dtype.element_ty), mask=on)


def _shape(streams: torch.Tensor) -> tuple[int, int, int, int]:
    n, c = streams.shape[-2], streams.shape[-1]
    return streams.numel() // (n * c), n, triton.next_power_of_2(n), c


def pre_forward(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """sum_i h_pre[i] x_i of contiguous streams (B, T, n, C) and h_pre (B, T, n)."""
    tokens, n, padded, c = _shape(streams)
    out = torch.empty((*streams.shape[:-2], c), dtype=streams.dtype, device=streams.device)
    _pre_forward[(tokens,)](streams, h_pre, out, c, N=n, NP=padded, BLOCK=BLOCK_C)
    return out


def pre_backward(
    streams: torch.Tensor, h_pre: torch.Tensor, grad: torch.Tensor, add: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_streams, d_h_pre) of pre_forward, d_streams plus `add` (the streams' gradient from
    elsewhere, in the same pass) where given."""
    tokens, n, padded, c = _shape(streams)
    d_streams, d_h = torch.empty_like(streams), torch.empty_like(h_pre)
    _pre_backward[(tokens,)](
        streams, h_pre, grad.contiguous(), add, d_streams, d_h, c, N=n, NP=padded,
        BLOCK=BLOCK_C, ADD=add is not None,
    )  # fmt: skip
    return d_streams, d_h


class _Pre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
        streams, h_pre = streams.contiguous(), h_pre.contiguous()
        ctx.save_for_backward(streams, h_pre)
        return pre_forward(streams, h_pre)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        streams, h_pre = ctx.saved_tensors
        return pre_backward(streams, h_pre, grad, None)


class _Post(torch.autograd.Function):
    @staticmethod
    def forward(ctx, streams, layer_out, h_res, h_post) -> torch.Tensor:
        streams, layer_out = streams.contiguous(), layer_out.contiguous()
        h_res, h_post = h_res.contiguous(), h_post.contiguous()
        tokens, n, padded, c = _shape(streams)
        out = torch.empty_like(streams)
        _post_forward[(tokens,)](
            streams, layer_out, h_res, h_post, out, c, N=n, NP=padded, BLOCK=BLOCK_C
        )
        ctx.save_for_backward(streams, layer_out, h_res, h_post)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        streams, layer_out, h_res, h_post = ctx.saved_tensors
        tokens, n, padded, c = _shape(streams)
        d_streams, d_out = torch.empty_like(streams), torch.empty_like(layer_out)
        d_res, d_post = torch.empty_like(h_res), torch.empty_like(h_post)
        _post_backward[(tokens,)](
            streams, layer_out, h_res, h_post, grad.contiguous(),
            d_streams, d_out, d_res, d_post, c, N=n, NP=padded, BLOCK=BLOCK_C,
        )  # fmt: skip
        return d_streams, d_out, d_res, d_post


@register("mhc_pre", "triton")
def mhc_pre(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """sum_i h_pre[i] x_i: (B, T, n, C), (B, T, n) -> (B, T, C), in the streams' dtype, or
    under autocast in its dtype (the reference's matmul runs in it)."""
    out = _Pre.apply(streams, h_pre)
    device = streams.device.type
    if torch.is_autocast_enabled(device):
        return out.to(torch.get_autocast_dtype(device))
    return out


@register("mhc_post", "triton")
def mhc_post(
    streams: torch.Tensor, layer_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor
) -> torch.Tensor:
    """H_res x + h_post^T F(x): (B,T,n,C), (B,T,C), (B,T,n,n), (B,T,n) -> (B,T,n,C), in the
    streams' dtype (float32 under autocast, as the reference keeps the residual)."""
    return _Post.apply(streams, layer_out, h_res, h_post)
