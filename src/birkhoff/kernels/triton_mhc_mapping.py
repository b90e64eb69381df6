"""mHC's mappings as Triton kernels (the `triton` backend's `mhc_mapping`): the RMS of the
flattened n C streams, the projection to 2n + n^2 values, the scales, biases and sigmoids in
one kernel, then the Sinkhorn projection as one more (kernels/triton_sinkhorn.py).

Forward: one program per 16 tokens reads their n C values once, accumulating the sum of
squares and the projection together (a float32 dot product, IEEE precision: H_res's logits
feed Sinkhorn) and writes H_pre, H_post and H_res's logits, (2n + n^2) floats per token;
the reference runs an RMSNorm (writing a normalised float32 copy of the streams), a GEMM,
and a dozen small elementwise kernels. Kept for the backward: the normalised projection l
and 1 / rms per token, no copy of the streams. Backward: one kernel pass computes per token
the activations' gradient dz on the 2n + n^2 values, dl = dz x scale (and r dl, which the
weight's gradient takes as one GEMM over the tokens) and the streams' gradient,
    dx = r (dl W) - x r^2 <dl, l> / (n C),   r = 1 / rms(x),
where dl is the gradient of l = r x W^T. The three scales alpha are read by the kernels
(no per-value copy), and their gradient is summed per token by the kernel and over the
tokens in torch with the biases' (one sum of a row per token: no atomics, deterministic);
the biases are read from their three tensors. Semantics and tolerance: the
reference's (kernels/mhc_reference.py), compared under TRITON_INTERPRET=1 in the tests.
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
def _scales(alpha_ptr, m, N: tl.constexpr):
    """Each projected value's scale (1, MP): alpha's pre, post or res entry by its column."""
    column = m[None, :]
    pre, post, res = tl.load(alpha_ptr), tl.load(alpha_ptr + 1), tl.load(alpha_ptr + 2)
    return tl.where(column < N, pre, tl.where(column < 2 * N, post, res))


@triton.jit
def _biases(pre_ptr, post_ptr, res_ptr, m, N: tl.constexpr, M: tl.constexpr):
    """Each projected value's bias (MP,), read from the three bias tensors where they lie (no
    concatenated copy: a launch each way)."""
    pre = tl.load(pre_ptr + m, mask=m < N, other=0.0)
    post = tl.load(post_ptr + m - N, mask=(m >= N) & (m < 2 * N), other=0.0)
    res = tl.load(res_ptr + m - 2 * N, mask=(m >= 2 * N) & (m < M), other=0.0)
    return (pre + post + res).to(tl.float32)


@triton.jit
def _store_mappings(pre_ptr, post_ptr, res_ptr, t, column, on, values, N: tl.constexpr):
    """A block's (BT, MP) values into H_pre (T, n), H_post (T, n) and H_res's logits (T, n^2),
    three contiguous outputs (no copies of column slices for the ops that take them)."""
    row = t[:, None]
    tl.store(pre_ptr + row * N + column, values, mask=on & (column < N))
    tl.store(post_ptr + row * N + column - N, values, mask=on & (column >= N) & (column < 2 * N))
    tl.store(res_ptr + row * N * N + column - 2 * N, values, mask=on & (column >= 2 * N))


@triton.jit
def _load_mappings(pre_ptr, post_ptr, res_ptr, t, column, on, N: tl.constexpr):
    """The (BT, MP) block back from the three (the gradients of the three outputs)."""
    row = t[:, None]
    pre = tl.load(pre_ptr + row * N + column, mask=on & (column < N), other=0.0)
    in_post = on & (column >= N) & (column < 2 * N)
    post = tl.load(post_ptr + row * N + column - N, mask=in_post, other=0.0)
    res = tl.load(res_ptr + row * N * N + column - 2 * N, mask=on & (column >= 2 * N), other=0.0)
    return pre + post + res


@triton.jit
def _forward(
    x_ptr, w_ptr, alpha_ptr, bpre_ptr, bpost_ptr, bres_ptr, pre_ptr, post_ptr, res_ptr, l_ptr,
    r_ptr, T, K, norm_eps, pre_eps,
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
    z = _scales(alpha_ptr, m, N) * projected
    z += _biases(bpre_ptr, bpost_ptr, bres_ptr, m, N, M)[None, :]
    gate = 1.0 / (1.0 + tl.exp(-z))
    column = m[None, :]
    out = tl.where(column < N, gate + pre_eps, tl.where(column < 2 * N, 2.0 * gate, z))
    both = (t < T)[:, None] & (m < M)[None, :]
    _store_mappings(pre_ptr, post_ptr, res_ptr, t, column, both, out, N)
    tl.store(l_ptr + t[:, None] * M + column, projected, mask=both)
    tl.store(r_ptr + t, r, mask=t < T)


@triton.jit
def _streams_backward(
    x_ptr, w_ptr, gpre_ptr, gpost_ptr, gres_ptr, l_ptr, alpha_ptr, bpre_ptr, bpost_ptr,
    bres_ptr, r_ptr, sums_ptr, dlr_ptr, add_ptr, dx_ptr, T, K,
    N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    ADD: tl.constexpr,
):  # fmt: skip
    """dx (plus the streams' other gradient at add_ptr, with ADD), r dl and the per-token sums
    of 16 tokens."""
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)  # 64-bit offsets
    m = tl.arange(0, MP)
    on = t < T
    values = on[:, None] & (m < M)[None, :]
    at = t[:, None] * M + m[None, :]
    column = m[None, :]  # H_pre = sigmoid (+ eps), H_post = 2 sigmoid, H_res's logits = z
    g = _load_mappings(gpre_ptr, gpost_ptr, gres_ptr, t, column, values, N)
    projected = tl.load(l_ptr + at, mask=values, other=0.0)
    scale = _scales(alpha_ptr, m, N)
    z = scale * projected + _biases(bpre_ptr, bpost_ptr, bres_ptr, m, N, M)[None, :]
    gate = 1.0 / (1.0 + tl.exp(-z))
    slope = tl.where(column < N, gate * (1.0 - gate),
                     tl.where(column < 2 * N, 2.0 * gate * (1.0 - gate), 1.0))  # fmt: skip
    dz = g * slope
    dl = dz * scale  # the gradient of l
    r = tl.load(r_ptr + t, mask=on, other=0.0)
    # per token, in one row of M + 3 (one sum over the tokens gives both): the biases'
    # gradient dz, then alpha's, dz l summed over each mapping's columns
    row = sums_ptr + t * (M + 3)
    tl.store(row[:, None] + m[None, :], dz, mask=values)
    dzl = dz * projected
    tl.store(row + M, tl.sum(tl.where(column < N, dzl, 0.0), axis=1), mask=on)
    in_post = (column >= N) & (column < 2 * N)
    tl.store(row + M + 1, tl.sum(tl.where(in_post, dzl, 0.0), axis=1), mask=on)
    tl.store(row + M + 2, tl.sum(tl.where(column >= 2 * N, dzl, 0.0), axis=1), mask=on)
    tl.store(dlr_ptr + at, dl * r[:, None], mask=values)  # the weight's GEMM takes r dl
    coeff = r * r * tl.sum(dl * projected, axis=1) / K
    for start in range(0, K, BK):
        k = start + tl.arange(0, BK)
        both = on[:, None] & (k < K)[None, :]
        w = tl.load(w_ptr + m[:, None] * K + k[None, :],
                    mask=(m < M)[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)  # fmt: skip
        x = tl.load(x_ptr + t[:, None] * K + k[None, :], mask=both, other=0.0).to(tl.float32)
        dx = r[:, None] * tl.dot(dl, w, input_precision="ieee") - x * coeff[:, None]
        if ADD:
            dx += tl.load(add_ptr + t[:, None] * K + k[None, :], mask=both, other=0.0).to(
                tl.float32
            )
        tl.store(dx_ptr + t[:, None] * K + k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=both)


def _sizes(n: int) -> tuple[int, int]:
    """(values per token 2n + n^2, padded to a power of two of at least 16 for tl.dot)."""
    m = 2 * n + n * n
    return m, max(16, triton.next_power_of_2(m))


def project_forward(
    flat: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, biases: list[torch.Tensor],
    n: int, norm_eps: float, pre_eps: float,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(H_pre, H_post, H_res's logits, then what the backward keeps: l and 1 / rms) of the
    contiguous (tokens, n C) streams."""
    tokens, width = flat.shape
    m, padded = _sizes(n)
    pre, post = (torch.empty(tokens, n, device=flat.device) for _ in range(2))
    logits = torch.empty(tokens, n * n, device=flat.device)
    projected = torch.empty(tokens, m, device=flat.device)
    r = torch.empty(tokens, device=flat.device)
    _forward[(triton.cdiv(tokens, BLOCK_T),)](
        flat, weight, alpha, *biases, pre, post, logits, projected, r, tokens,
        width, norm_eps, pre_eps, N=n, M=m, MP=padded, BT=BLOCK_T, BK=BLOCK_K,
    )  # fmt: skip
    return pre, post, logits, projected, r


def project_backward(
    saved: tuple[torch.Tensor, ...], n: int, grad_pre: torch.Tensor, grad_post: torch.Tensor,
    grad_res: torch.Tensor, add: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The gradients of the flat streams (plus `add`, the streams' gradient from elsewhere,
    in the same pass, where given), the weight, alpha and the three biases; `saved` is (flat,
    weight, alpha, the three biases, l, 1 / rms)."""
    flat, weight, alpha, *biases, projected, r = saved
    tokens, width = flat.shape
    m, padded = _sizes(n)
    per_token = torch.empty(tokens, m + 3, device=flat.device)  # dz, then alpha's three
    d_l_r, d_flat = torch.empty_like(projected), torch.empty_like(flat)
    _streams_backward[(triton.cdiv(tokens, BLOCK_T),)](
        flat, weight, grad_pre.contiguous(), grad_post.contiguous(), grad_res.contiguous(),
        projected, alpha, *biases, r, per_token, d_l_r, add, d_flat, tokens, width,
        N=n, M=m, MP=padded, BT=BLOCK_T, BK=BLOCK_K, ADD=add is not None,
    )  # fmt: skip
    sums = per_token.sum(0)
    d_biases = sums[:n], sums[n : 2 * n], sums[2 * n : m].view(n, n)
    with torch.autocast(flat.device.type, enabled=False):  # float32, as the forward's
        d_weight = d_l_r.T @ flat.float()
    return (d_flat, d_weight.to(weight.dtype), sums[m:].to(alpha.dtype),
            *(d.to(b.dtype) for d, b in zip(d_biases, biases, strict=True)))  # fmt: skip


class _Project(torch.autograd.Function):
    """(tokens, n C) streams -> H_pre (tokens, n), H_post (tokens, n), H_res's logits
    (tokens, n^2)."""

    @staticmethod
    def forward(ctx, flat, weight, alpha, bias_pre, bias_post, bias_res, n, norm_eps, pre_eps):
        flat, weight, alpha = flat.contiguous(), weight.contiguous(), alpha.contiguous()
        biases = [b.contiguous() for b in (bias_pre, bias_post, bias_res)]
        pre, post, logits, *kept = project_forward(
            flat, weight, alpha, biases, n, norm_eps, pre_eps
        )
        ctx.n = n
        ctx.save_for_backward(flat, weight, alpha, *biases, *kept)
        return pre, post, logits

    @staticmethod
    def backward(ctx, grad_pre: torch.Tensor, grad_post: torch.Tensor, grad_res: torch.Tensor):
        grads = project_backward(ctx.saved_tensors, ctx.n, grad_pre, grad_post, grad_res)
        return *grads, None, None, None


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
    h_pre, h_post, logits = _Project.apply(
        streams.flatten(-2).reshape(-1, streams.shape[-2] * streams.shape[-1]),
        weight, alpha, bias_pre, bias_post, bias_res, n, norm_eps,
        0.0 if form_eps is None else form_eps,
    )  # fmt: skip
    logits = logits.reshape(*batch, n, n)
    if form_eps is None:
        h_res = sinkhorn_knopp(logits, iters)
    else:
        h_res = sinkhorn_knopp_eps(logits, iters, form_eps)
    return h_pre.reshape(*batch, n), h_post.reshape(*batch, n), h_res
