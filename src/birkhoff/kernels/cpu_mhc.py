"""mHC's ops as fused C kernels on a CPU (the `cpu` backend; kernels/cpu_mhc.c, built by
kernels/cpu_build.py): the stream read, the residual merge, Sinkhorn-Knopp in both forms, and the
mappings' per-token tail (scales, biases, sigmoids, Sinkhorn) after the normalised projection,
which stays one GEMM and one norm (kernels/mhc_reference.py's `normalised_projection`).

Each op is an autograd Function over float32 inputs (the registry runs the reference for other
dtypes and says so): one pass over a token's streams forward and one backward, where the
reference's batched products and broadcasts each pass over all tokens again; Sinkhorn's
backward recomputes the iterations per token, keeping only the logits (as the reference). Under
torch.compile the reference's plain expressions are traced instead, which inductor fuses.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch.autograd.function import once_differentiable

from birkhoff.kernels import mhc_reference as reference
from birkhoff.kernels.cpu_build import library
from birkhoff.kernels.registry import CPU, register

_INT64, _INT, _FLOAT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {  # the C functions' arguments after their pointers: sizes, then options
    "mhc_pre_forward": (3, (_INT64, _INT64, _INT64, _INT)),
    "mhc_pre_backward": (5, (_INT64, _INT64, _INT64, _INT)),
    "mhc_post_forward": (5, (_INT64, _INT64, _INT64, _INT)),
    "mhc_post_backward": (9, (_INT64, _INT64, _INT64, _INT)),
    "sinkhorn_forward": (2, (_INT64, _INT64, _INT, _FLOAT, _INT)),
    "sinkhorn_backward": (3, (_INT64, _INT64, _INT, _FLOAT, _INT)),
    "mhc_tail_forward": (6, (_INT64, _INT64, _INT, _FLOAT, _FLOAT, _INT)),
    "mhc_tail_backward": (7, (_INT64, _INT64, _INT, _FLOAT, _INT)),
}
LOG_SPACE = -1.0  # form_eps for the paper's log-space Sinkhorn


@functools.cache
def _kernels() -> ctypes.CDLL:
    lib = library()
    for name, (pointers, rest) in _SIGNATURES.items():
        getattr(lib, name).argtypes = [_PTR] * pointers + list(rest)
        getattr(lib, name).restype = None
    return lib


def _call(name: str, *args) -> None:
    """`name` with tensors as pointers (None: NULL) and the thread count last."""
    pointers = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    getattr(_kernels(), name)(*pointers, torch.get_num_threads())


def _floats(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32).contiguous()


def _empty_if(needed: bool, *shape: int) -> torch.Tensor | None:
    return torch.empty(shape) if needed else None


class _StreamRead(torch.autograd.Function):
    """sum_i h[i] x_i per token: x (M, n, C), h (M, n) -> (M, C)."""

    @staticmethod
    def forward(ctx, streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(streams, h_pre)
        tokens, n, width = streams.shape
        out = torch.empty(tokens, width)
        _call("mhc_pre_forward", streams, h_pre, out, tokens, n, width)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        streams, h_pre = ctx.saved_tensors
        tokens, n, width = streams.shape
        d_streams = _empty_if(ctx.needs_input_grad[0], tokens, n, width)
        d_h = _empty_if(ctx.needs_input_grad[1], tokens, n)
        grad = _floats(grad)
        _call("mhc_pre_backward", grad, streams, h_pre, d_streams, d_h, tokens, n, width)
        return d_streams, d_h


class _StreamMerge(torch.autograd.Function):
    """H_res x + h_post^T y per token: x (M, n, C), y (M, C), H_res (M, n, n), h_post (M, n)."""

    @staticmethod
    def forward(ctx, streams, layer_out, h_res, h_post) -> torch.Tensor:
        ctx.save_for_backward(streams, layer_out, h_res, h_post)
        out = torch.empty_like(streams)
        _call("mhc_post_forward", streams, layer_out, h_res, h_post, out, *streams.shape)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        streams, layer_out, h_res, h_post = ctx.saved_tensors
        tokens, n, width = streams.shape
        need = ctx.needs_input_grad
        grads = (
            _empty_if(need[0], tokens, n, width),
            _empty_if(need[1], tokens, width),
            _empty_if(need[2], tokens, n, n),
            _empty_if(need[3], tokens, n),
        )
        _call(
            "mhc_post_backward", _floats(grad), streams, layer_out, h_res, h_post, *grads,
            tokens, n, width,
        )  # fmt: skip
        return grads


class _Sinkhorn(torch.autograd.Function):
    """Sinkhorn-Knopp of (M, n, n) logits; backward recomputes the iterations per token."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, form_eps: float) -> torch.Tensor:
        ctx.iters, ctx.form_eps = iters, form_eps
        ctx.save_for_backward(logits)
        out = torch.empty_like(logits)
        _call("sinkhorn_forward", logits, out, logits.shape[0], logits.shape[1], iters, form_eps)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        d_logits = torch.empty_like(logits)
        tokens, n = logits.shape[:2]
        _call(
            "sinkhorn_backward", logits, _floats(grad), d_logits, tokens, n, ctx.iters,
            ctx.form_eps,
        )  # fmt: skip
        return d_logits, None, None


class _MappingTail(torch.autograd.Function):
    """(H_pre, H_post, H_res) from the projection q (M, K = 2n + n^2), the per-value scale a (K,)
    and bias b (K,): z = a q + b; sigmoid(z) + pre_eps, 2 sigmoid(z), Sinkhorn(z) per token."""

    @staticmethod
    def forward(ctx, q, a, b, n: int, iters: int, pre_eps: float, form_eps: float):
        ctx.n, ctx.iters, ctx.form_eps = n, iters, form_eps
        ctx.save_for_backward(q, a, b)
        tokens = q.shape[0]
        h_pre, h_post, h_res = (
            torch.empty(tokens, n),
            torch.empty(tokens, n),
            torch.empty(tokens, n, n),
        )
        _call(
            "mhc_tail_forward", q, a, b, h_pre, h_post, h_res, tokens, n, iters, pre_eps,
            form_eps,
        )  # fmt: skip
        return h_pre, h_post, h_res

    @staticmethod
    @once_differentiable
    def backward(ctx, d_pre, d_post, d_res):
        q, a, b = ctx.saved_tensors
        d_z = torch.empty_like(q)
        grads = [None if g is None else _floats(g) for g in (d_pre, d_post, d_res)]
        _call(
            "mhc_tail_backward", q, a, b, *grads, d_z, q.shape[0], ctx.n, ctx.iters,
            ctx.form_eps,
        )  # fmt: skip
        d_q = d_z * a if ctx.needs_input_grad[0] else None
        d_a = (d_z * q).sum(0) if ctx.needs_input_grad[1] else None
        return d_q, d_a, d_z.sum(0), None, None, None, None


def _on_cpu(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        if tensor.device.type != "cpu":
            raise ValueError(f"the cpu kernels got a tensor on {tensor.device}")


@register("mhc_pre", CPU, dtypes=(torch.float32,))
def mhc_pre(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """The reference's `mhc_pre`, accumulated in float32 and returned in the dtype a matmul of
    the streams runs in (autocast's under autocast)."""
    if torch.compiler.is_compiling():
        return reference.mhc_pre(streams, h_pre)
    _on_cpu(streams, h_pre)
    dtype, (*batch, n, width) = reference._matmul_dtype(streams), streams.shape
    with torch.autocast("cpu", enabled=False):
        out = _StreamRead.apply(
            _floats(streams.reshape(-1, n, width)), _floats(h_pre.reshape(-1, n))
        )
    return out.view(*batch, width).to(dtype)


@register("mhc_post", CPU, dtypes=(torch.float32,))
def mhc_post(
    streams: torch.Tensor, layer_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor
) -> torch.Tensor:
    """The reference's `mhc_post` (next streams in the streams' float32) in one pass."""
    if torch.compiler.is_compiling():
        return reference.mhc_post(streams, layer_out, h_res, h_post)
    _on_cpu(streams, layer_out, h_res, h_post)
    *batch, n, width = streams.shape
    with torch.autocast("cpu", enabled=False):
        merged = _StreamMerge.apply(
            _floats(streams.reshape(-1, n, width)),
            _floats(layer_out.reshape(-1, width)),
            _floats(h_res.reshape(-1, n, n)),
            _floats(h_post.reshape(-1, n)),
        )
    return merged.view(*batch, n, width)


def _sinkhorn(logits: torch.Tensor, iters: int, form_eps: float) -> torch.Tensor:
    _on_cpu(logits)
    n = logits.shape[-1]
    with torch.autocast("cpu", enabled=False):
        out = _Sinkhorn.apply(_floats(logits.reshape(-1, n, n)), iters, form_eps)
    return out.view(logits.shape)


@register("sinkhorn_knopp", CPU, dtypes=(torch.float32,))
def sinkhorn_knopp(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """The reference's log-space Sinkhorn-Knopp, per token in one kernel each way."""
    if torch.compiler.is_compiling():
        return reference.sinkhorn_knopp(logits, iters)
    return _sinkhorn(logits, iters, LOG_SPACE)


@register("sinkhorn_knopp_eps", CPU, dtypes=(torch.float32,))
def sinkhorn_knopp_eps(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """V4's linear-space Sinkhorn-Knopp, per token in one kernel each way."""
    if torch.compiler.is_compiling():
        return reference.sinkhorn_knopp_eps(logits, iters, eps)
    if eps < 0:
        raise ValueError(f"V4's Sinkhorn eps must be >= 0, got {eps}")
    return _sinkhorn(logits, iters, eps)


@register("mhc_mapping", CPU, dtypes=(torch.float32,))
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
    """The reference's `mhc_mapping`: its normalised projection (one GEMM, one norm), then the
    scales, biases, sigmoids and Sinkhorn of every token in one kernel each way."""
    args = (streams, weight, alpha, bias_pre, bias_post, bias_res, norm_eps, iters, form_eps)
    if torch.compiler.is_compiling():
        return reference.mhc_mapping(*args)
    _on_cpu(streams, weight, alpha)
    n, batch = streams.shape[-2], streams.shape[:-2]
    projected = reference.normalised_projection(streams, weight, norm_eps)
    with torch.autocast("cpu", enabled=False):
        alpha = alpha.float()
        scale = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])
        bias = torch.cat([bias_pre.float(), bias_post.float(), bias_res.float().flatten()])
        h_pre, h_post, h_res = _MappingTail.apply(
            projected.reshape(-1, projected.shape[-1]).contiguous(),
            scale,
            bias,
            n,
            iters,
            0.0 if form_eps is None else form_eps,
            LOG_SPACE if form_eps is None else form_eps,
        )
    return h_pre.view(*batch, n), h_post.view(*batch, n), h_res.view(*batch, n, n)
