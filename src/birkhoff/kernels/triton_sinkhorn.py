"""mHC's Sinkhorn-Knopp projection (`sinkhorn_knopp`, log space; `sinkhorn_knopp_eps`, V4's
linear-space form) as Triton kernels:
one launch for the forward and one for the backward of all of a step's n x n matrices, where
the reference launches two log-sum-exps per iteration (40 per join and direction at 20
iterations). The backward recomputes the iterations (the mHC paper's §4.3) instead of
keeping them: it runs the forward again, writing each half-step's normaliser (n floats)
to a scratch buffer, then walks back. A half-step L' = L - lse_k(L) has the gradient
dL = dL' - exp(L') * sum_k dL' and its input is L' + lse_k(L), so walking back needs only
the normalisers. Everything is in float32; the semantics are the reference's
(kernels/mhc_reference.py), which the tests compare against under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from birkhoff.kernels.registry import register

BLOCK_T = 32  # matrices per program


@triton.jit
def _tile(T, N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    """Offsets of this program's (BLOCK, NP, NP) tile of (T, N, N) matrices, and its mask."""
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit offsets
    i = tl.arange(0, NP)
    j = tl.arange(0, NP)
    offs = t[:, None, None] * N * N + i[None, :, None] * N + j[None, None, :]
    valid = (t[:, None, None] < T) & (i[None, :, None] < N) & (j[None, None, :] < N)
    return t, i, j, offs, valid


@triton.jit
def _lse(x, axis: tl.constexpr):
    """log-sum-exp over `axis`, kept as a size-1 dimension; -inf where everything is -inf
    (padding)."""
    top = tl.max(x, axis=axis, keep_dims=True)
    top = tl.where(top == float("-inf"), 0.0, top)
    return top + tl.log(tl.sum(tl.exp(x - top), axis=axis, keep_dims=True))


@triton.jit
def _forward(x_ptr, out_ptr, T, ITERS: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
             BLOCK: tl.constexpr):  # fmt: skip
    _, _, _, offs, valid = _tile(T, N, NP, BLOCK)
    log_m = tl.load(x_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    for _ in range(ITERS):  # columns (over i), then rows (over j), as the reference
        log_m = tl.where(valid, log_m - _lse(log_m, 1), float("-inf"))
        log_m = tl.where(valid, log_m - _lse(log_m, 2), float("-inf"))
    tl.store(out_ptr + offs, tl.exp(log_m), mask=valid)


@triton.jit
def _backward(x_ptr, g_ptr, dx_ptr, norm_ptr, T, ITERS: tl.constexpr, N: tl.constexpr,
              NP: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    t, i, j, offs, valid = _tile(T, N, NP, BLOCK)
    # normalisers of half-step s of matrix t: norm_ptr[t, s, :] (columns: by j; rows: by i)
    by_j = t[:, None, None] * 2 * ITERS * NP + j[None, None, :]
    by_i = t[:, None, None] * 2 * ITERS * NP + i[None, :, None]
    rows_in = t[:, None, None] < T
    log_m = tl.load(x_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    for k in range(ITERS):
        norm = _lse(log_m, 1)
        tl.store(norm_ptr + by_j + 2 * k * NP, norm, mask=rows_in)
        log_m = tl.where(valid, log_m - norm, float("-inf"))
        norm = _lse(log_m, 2)
        tl.store(norm_ptr + by_i + (2 * k + 1) * NP, norm, mask=rows_in)
        log_m = tl.where(valid, log_m - norm, float("-inf"))
    grad = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    d_log = grad * tl.exp(log_m)
    for back in range(ITERS):
        k = ITERS - 1 - back
        d_log = d_log - tl.exp(log_m) * tl.sum(d_log, axis=2, keep_dims=True)
        norm = tl.load(norm_ptr + by_i + (2 * k + 1) * NP, mask=rows_in, other=0.0)
        log_m = tl.where(valid, log_m + norm, float("-inf"))
        d_log = d_log - tl.exp(log_m) * tl.sum(d_log, axis=1, keep_dims=True)
        norm = tl.load(norm_ptr + by_j + 2 * k * NP, mask=rows_in, other=0.0)
        log_m = tl.where(valid, log_m + norm, float("-inf"))
    tl.store(dx_ptr + offs, d_log, mask=valid)


@triton.jit
def _softmax_plus_eps(x_ptr, offs, valid, eps):
    """V4's start: a softmax down each column (over i) plus eps; (its softmax, the matrix)."""
    logits = tl.load(x_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    top = tl.max(logits, axis=1, keep_dims=True)
    top = tl.where(top == float("-inf"), 0.0, top)
    e = tl.exp(logits - top)
    p = e / tl.maximum(tl.sum(e, axis=1, keep_dims=True), 1e-30)
    return p, tl.where(valid, p + eps, 0.0)


@triton.jit
def _forward_eps(x_ptr, out_ptr, T, eps, ITERS: tl.constexpr, N: tl.constexpr,
                 NP: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    _, _, _, offs, valid = _tile(T, N, NP, BLOCK)
    _, m = _softmax_plus_eps(x_ptr, offs, valid, eps)
    m = m / (tl.sum(m, axis=2, keep_dims=True) + eps)
    for _ in range(ITERS - 1):
        m = m / (tl.sum(m, axis=1, keep_dims=True) + eps)
        m = m / (tl.sum(m, axis=2, keep_dims=True) + eps)
    tl.store(out_ptr + offs, m, mask=valid)


@triton.jit
def _backward_eps(x_ptr, g_ptr, dx_ptr, norm_ptr, T, eps, ITERS: tl.constexpr,
                  N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """m' = m / D with D = sum_k m + eps has the gradient dm = (dm' - sum_k dm' m') / D and
    its input is m' D: walking back needs each half-step's divisors D (slot 0: the first row
    step; slots 2k - 1, 2k: iteration k's columns and rows)."""
    t, i, j, offs, valid = _tile(T, N, NP, BLOCK)
    by_j = t[:, None, None] * 2 * ITERS * NP + j[None, None, :]
    by_i = t[:, None, None] * 2 * ITERS * NP + i[None, :, None]
    rows_in = t[:, None, None] < T
    p, m = _softmax_plus_eps(x_ptr, offs, valid, eps)
    # row divisors are (B, NP, 1), column divisors (B, 1, NP): one name each, since a loop
    # variable must keep its shape (Triton's compiler refuses it; the interpreter does not)
    row_divisor = tl.sum(m, axis=2, keep_dims=True) + eps
    tl.store(norm_ptr + by_i, row_divisor, mask=rows_in)
    m = m / row_divisor
    for k in range(1, ITERS):
        col_divisor = tl.sum(m, axis=1, keep_dims=True) + eps
        tl.store(norm_ptr + by_j + (2 * k - 1) * NP, col_divisor, mask=rows_in)
        m = m / col_divisor
        row_divisor = tl.sum(m, axis=2, keep_dims=True) + eps
        tl.store(norm_ptr + by_i + 2 * k * NP, row_divisor, mask=rows_in)
        m = m / row_divisor
    d_m = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    for back in range(ITERS - 1):
        k = ITERS - 1 - back
        row_divisor = tl.load(norm_ptr + by_i + 2 * k * NP, mask=rows_in, other=1.0)
        # padding keeps a zero gradient (its divisors are eps: anything else would grow 1/eps
        # a step)
        d_m = tl.where(valid, (d_m - tl.sum(d_m * m, axis=2, keep_dims=True)) / row_divisor, 0.0)
        m = m * row_divisor
        col_divisor = tl.load(norm_ptr + by_j + (2 * k - 1) * NP, mask=rows_in, other=1.0)
        d_m = tl.where(valid, (d_m - tl.sum(d_m * m, axis=1, keep_dims=True)) / col_divisor, 0.0)
        m = m * col_divisor
    row_divisor = tl.load(norm_ptr + by_i, mask=rows_in, other=1.0)
    d_m = tl.where(valid, (d_m - tl.sum(d_m * m, axis=2, keep_dims=True)) / row_divisor, 0.0)
    d_x = p * (d_m - tl.sum(d_m * p, axis=1, keep_dims=True))  # the softmax's
    tl.store(dx_ptr + offs, tl.where(valid, d_x, 0.0), mask=valid)


def _launch(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(matrices, n) flattened to float32 (T, n, n), the count, n and its power-of-two pad."""
    n = logits.shape[-1]
    flat = logits.reshape(-1, n, n).float().contiguous()
    return flat, flat.shape[0], n, triton.next_power_of_2(n)


def sinkhorn_forward(logits: torch.Tensor, iters: int, eps: float | None) -> torch.Tensor:
    """Either form's projection of logits (..., n, n), float32 (`eps` None: log space)."""
    flat, count, n, padded = _launch(logits)
    out = torch.empty_like(flat)
    kernel, scalars = (_forward, ()) if eps is None else (_forward_eps, (eps,))
    grid = (triton.cdiv(count, BLOCK_T),)
    kernel[grid](flat, out, count, *scalars, ITERS=iters, N=n, NP=padded, BLOCK=BLOCK_T)
    return out.view(logits.shape)


def sinkhorn_backward(
    logits: torch.Tensor, grad: torch.Tensor, iters: int, eps: float | None
) -> torch.Tensor:
    """The logits' gradient (float32) of sinkhorn_forward, the iterations recomputed."""
    flat, count, n, padded = _launch(logits)
    grad_flat = grad.reshape(-1, n, n).float().contiguous()
    d_logits = torch.empty_like(flat)
    norms = torch.empty(count, 2 * iters, padded, device=flat.device)
    kernel, scalars = (_backward, ()) if eps is None else (_backward_eps, (eps,))
    grid = (triton.cdiv(count, BLOCK_T),)
    kernel[grid](
        flat, grad_flat, d_logits, norms, count, *scalars,
        ITERS=iters, N=n, NP=padded, BLOCK=BLOCK_T,
    )  # fmt: skip
    return d_logits.view(logits.shape)


class _Sinkhorn(torch.autograd.Function):
    """Either form: `eps` None is the log-space one, a float V4's."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float | None) -> torch.Tensor:
        ctx.iters, ctx.eps = iters, eps
        ctx.save_for_backward(logits)
        return sinkhorn_forward(logits, iters, eps).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        d_logits = sinkhorn_backward(logits, grad, ctx.iters, ctx.eps)
        return d_logits.to(logits.dtype), None, None


@register("sinkhorn_knopp", "triton")
def sinkhorn_knopp(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """exp(logits) projected toward the doubly stochastic matrices over the last two dims
    (columns, then rows, `iters` times, in log space): (..., n, n) -> (..., n, n)."""
    return _Sinkhorn.apply(logits, iters, None)


@register("sinkhorn_knopp_eps", "triton")
def sinkhorn_knopp_eps(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """DeepSeek-V4's production Sinkhorn (kernels/mhc_reference.py, _sinkhorn_eps): a softmax
    down each column plus eps, rows normalised, then iters - 1 times columns and rows, each
    sum taken as (sum + eps); linear space. (..., n, n) -> (..., n, n)."""
    return _Sinkhorn.apply(logits, iters, eps)
