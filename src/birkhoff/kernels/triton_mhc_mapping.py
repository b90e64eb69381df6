"""mHC's mappings as Triton kernels (the `triton` backend's `mhc_mapping`): the RMS of the
flattened n C streams, the projection to 2n + n^2 values, the scales, biases and sigmoids in
one kernel, then the Sinkhorn projection as one more (kernels/triton_sinkhorn.py).

Forward: one program per 16 tokens reads their n C values once, accumulating the sum of
squares and the projection together (a float32 dot product, IEEE precision: H_res's logits
feed Sinkhorn) and writes H_pre, H_post and H_res's logits, (2n + n^2) floats per token;
the reference runs an RMSNorm (writing a normalised float32 copy of the streams), a GEMM,
and a dozen small elementwise kernels. Kept for the backward: the normalised projection l
and 1 / rms per token, no copy of the streams. Backward: the scales', biases' and
activations' gradients on the (tokens, 2n + n^2) values in torch; the weight's gradient as
one GEMM over the tokens; the streams' gradient in one kernel pass,
    dx = r (dl W) - x r^2 <dl, l> / (n C),   r = 1 / rms(x),
where dl is the gradient of l = r x W^T. Semantics and tolerance: the reference's
(kernels/mhc_reference.py), compared under TRITON_INTERPRET=1 in the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from birkhoff.kernels.registry import register
from birkhoff.kernels.triton_sinkhorn import sinkhorn_knopp, sinkhorn_knopp_eps

BLOCK_T = 16  # tokens per program (tl.dot's least)
BLOCK_K = 64  # stream values per step


@triton.jit
def _forward(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, l_ptr, r_ptr, T, K, norm_eps, pre_eps,
    N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)  # 64-bit offsets
    m = tl.arange(0, MP)
    acc = tl.zeros((BT, MP), dtype=tl.float32)
    squares = tl.zeros((BT,), dtype=tl.float32)
    for start in range(0, K, BK):
        k = start + tl.arange(0, BK)
        x = tl.load(x_ptr + t[:, None] * K + k[None, :],
                    mask=(t < T)[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)  # fmt: skip
        w = tl.load(w_ptr + m[None, :] * K + k[:, None],
                    mask=(k < K)[:, None] & (m < M)[None, :], other=0.0).to(tl.float32)  # fmt: skip
        acc += tl.dot(x, w, input_precision="ieee")
        squares += tl.sum(x * x, axis=1)
    r = 1.0 / tl.sqrt(squares / K + norm_eps)
    projected = acc * r[:, None]
    z = tl.load(scale_ptr + m, mask=m < M, other=0.0)[None, :] * projected
    z += tl.load(bias_ptr + m, mask=m < M, other=0.0)[None, :]
    gate = 1.0 / (1.0 + tl.exp(-z))
    column = m[None, :]
    out = tl.where(column < N, gate + pre_eps, tl.where(column < 2 * N, 2.0 * gate, z))
    both = (t < T)[:, None] & (m < M)[None, :]
    tl.store(out_ptr + t[:, None] * M + column, out, mask=both)
    tl.store(l_ptr + t[:, None] * M + column, projected, mask=both)
    tl.store(r_ptr + t, r, mask=t < T)


@triton.jit
def _streams_backward(
    x_ptr, w_ptr, dl_ptr, r_ptr, coeff_ptr, dx_ptr, T, K,
    M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)  # 64-bit offsets
    m = tl.arange(0, MP)
    on = t < T
    dl = tl.load(dl_ptr + t[:, None] * M + m[None, :], mask=on[:, None] & (m < M)[None, :],
                 other=0.0)  # fmt: skip
    r = tl.load(r_ptr + t, mask=on, other=0.0)
    coeff = tl.load(coeff_ptr + t, mask=on, other=0.0)  # r^2 <dl, l> / K
    for start in range(0, K, BK):
        k = start + tl.arange(0, BK)
        both = on[:, None] & (k < K)[None, :]
        w = tl.load(w_ptr + m[:, None] * K + k[None, :],
                    mask=(m < M)[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)  # fmt: skip
        x = tl.load(x_ptr + t[:, None] * K + k[None, :], mask=both, other=0.0).to(tl.float32)
        dx = r[:, None] * tl.dot(dl, w, input_precision="ieee") - x * coeff[:, None]
        tl.store(dx_ptr + t[:, None] * K + k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=both)


def _sizes(n: int) -> tuple[int, int]:
    """(values per token 2n + n^2, padded to a power of two of at least 16 for tl.dot)."""
    m = 2 * n + n * n
    return m, max(16, triton.next_power_of_2(m))


class _Project(torch.autograd.Function):
    """(tokens, n C) streams -> (tokens, 2n + n^2): H_pre, H_post and H_res's logits."""

    @staticmethod
    def forward(ctx, flat, weight, scale, bias, n: int, norm_eps: float, pre_eps: float):
        flat, weight = flat.contiguous(), weight.contiguous()
        tokens, width = flat.shape
        m, padded = _sizes(n)
        out = torch.empty(tokens, m, device=flat.device)
        projected, r = torch.empty_like(out), torch.empty(tokens, device=flat.device)
        _forward[(triton.cdiv(tokens, BLOCK_T),)](
            flat, weight, scale.float().contiguous(), bias.float().contiguous(), out,
            projected, r, tokens, width, norm_eps, pre_eps,
            N=n, M=m, MP=padded, BT=BLOCK_T, BK=BLOCK_K,
        )  # fmt: skip
        ctx.n = n
        ctx.save_for_backward(flat, weight, scale, bias, projected, r)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, weight, scale, bias, projected, r = ctx.saved_tensors
        n, (tokens, width) = ctx.n, flat.shape
        m, padded = _sizes(n)
        z = scale.float() * projected + bias.float()
        gate = torch.sigmoid(z)
        slope = gate * (1 - gate)
        slope[:, n : 2 * n] *= 2  # H_post = 2 sigmoid
        slope[:, 2 * n :] = 1  # H_res's logits are z itself
        d_z = grad * slope
        d_scale, d_bias = (d_z * projected).sum(0), d_z.sum(0)
        d_projected = (d_z * scale.float()).contiguous()
        with torch.autocast(flat.device.type, enabled=False):  # float32, as the forward's
            d_weight = (d_projected * r[:, None]).T @ flat.float()
        coeff = (r * r * (d_projected * projected).sum(1) / width).contiguous()
        d_flat = torch.empty_like(flat)
        _streams_backward[(triton.cdiv(tokens, BLOCK_T),)](
            flat, weight, d_projected, r, coeff, d_flat, tokens, width,
            M=m, MP=padded, BT=BLOCK_T, BK=BLOCK_K,
        )  # fmt: skip
        return (d_flat, d_weight.to(weight.dtype), d_scale.to(scale.dtype),
                d_bias.to(bias.dtype), None, None, None)  # fmt: skip


@register("mhc_mapping", "triton")
def mhc_mapping(
    streams: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    bias_pre: torch.Tensor,
    bias_post: torch.Tensor,
    bias_res: torch.Tensor,
    norm_eps: float,
    iters: int,
    form_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, n, C) streams -> H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n) in
    float32, as the reference's mhc_mapping (V4's form with `form_eps`)."""
    n = streams.shape[-2]
    batch = streams.shape[:-2]
    # per projected value its alpha (no host-built repeat counts: no copy to the device)
    scale = torch.cat((alpha[0:1].expand(n), alpha[1:2].expand(n), alpha[2:3].expand(n * n)))
    bias = torch.cat((bias_pre, bias_post, bias_res.flatten()))
    out = _Project.apply(
        streams.flatten(-2).reshape(-1, streams.shape[-2] * streams.shape[-1]),
        weight, scale, bias, n, norm_eps, 0.0 if form_eps is None else form_eps,
    )  # fmt: skip
    h_pre, h_post, logits = out.split([n, n, n * n], dim=-1)
    logits = logits.reshape(*batch, n, n)
    if form_eps is None:
        h_res = sinkhorn_knopp(logits, iters)
    else:
        h_res = sinkhorn_knopp_eps(logits, iters, form_eps)
    return h_pre.reshape(*batch, n), h_post.reshape(*batch, n), h_res
