"""mHC's ops as fused C kernels on a CPU (the `cpu` backend; kernels/cpu_*.c, built by
kernels/cpu_build.py): the stream read, the residual merge, Sinkhorn-Knopp in both forms, and the
mappings' per-token tail (scales, biases, sigmoids, Sinkhorn) after the normalised projection,
which stays one GEMM and one norm (kernels/mhc_reference.py's `normalised_projection`).

Each kernel is a torch custom op computing in float32 (float32, bf16 and fp16 inputs; the
registry runs the reference for float64 and says so) with its backward registered as another:
one pass over a token's streams forward and one backward, where the reference's batched
products and broadcasts each pass over all tokens again; Sinkhorn's backward recomputes the
iterations per block of tokens, keeping only the logits (as the reference). Under
torch.compile the registered ops trace the reference's plain expressions, which inductor
fuses: with the custom ops called from compiled blocks instead (measured once, these branches
removed by hand), a compiled `small` step took as long (mHC's overhead +25.6% against +25.3%,
2026-12-06, a 2-core CPU), so the compiled path stays the reference's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from birkhoff.kernels import mhc_reference as reference
from birkhoff.kernels.cpu_library import (
    DTYPES,
    autograd_paths,
    call,
    check,
    check_inputs,
    check_iters,
    check_shapes,
    float32_contiguous,
    kernel_op,
)
from birkhoff.kernels.registry import CPU, register

LOG_SPACE = -1.0  # form_eps for the paper's log-space Sinkhorn


# Each C kernel is a torch custom op: autograd is registered on the forward op, its backward
# is another op, and a fake (shape-only) version lets the ops be traced.
@kernel_op("cpu_stream_read")
def stream_read(streams: Tensor, h_pre: Tensor) -> Tensor:
    """sum_i h[i] x_i per token: x (M, n, C), h (M, n) -> (M, C)."""
    check_inputs(streams, h_pre)
    check_shapes((h_pre, streams.shape[:2]))
    out = streams.new_empty(streams.shape[0], streams.shape[2])
    call("stream_read_forward", streams, h_pre, out, *streams.shape)
    return out


@stream_read.register_fake
def _(streams: Tensor, h_pre: Tensor) -> Tensor:
    return streams.new_empty(streams.shape[0], streams.shape[2])


@kernel_op("cpu_stream_read_backward")
def stream_read_backward(grad: Tensor, streams: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    check_inputs(grad, streams, h_pre)
    check_shapes((h_pre, streams.shape[:2]), (grad, (streams.shape[0], streams.shape[2])))
    d_streams, d_h = torch.empty_like(streams), torch.empty_like(h_pre)
    call("stream_read_backward", grad, streams, h_pre, d_streams, d_h, *streams.shape)
    return d_streams, d_h


@stream_read_backward.register_fake
def _(grad: Tensor, streams: Tensor, h_pre: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(streams), torch.empty_like(h_pre)


def check_merge(streams: Tensor, layer_out: Tensor, h_res: Tensor, h_post: Tensor) -> None:
    check_inputs(streams, layer_out, h_res, h_post)
    tokens, n, width = streams.shape
    check_shapes((layer_out, (tokens, width)), (h_res, (tokens, n, n)), (h_post, (tokens, n)))


@kernel_op("cpu_stream_merge")
def stream_merge(streams: Tensor, layer_out: Tensor, h_res: Tensor, h_post: Tensor) -> Tensor:
    """H_res x + h_post^T y per token: x (M, n, C), y (M, C), H_res (M, n, n), h_post (M, n)."""
    check_merge(streams, layer_out, h_res, h_post)
    out = torch.empty_like(streams)
    call("stream_merge_forward", streams, layer_out, h_res, h_post, out, *streams.shape)
    return out


@stream_merge.register_fake
def _(streams: Tensor, layer_out: Tensor, h_res: Tensor, h_post: Tensor) -> Tensor:
    return torch.empty_like(streams)


@kernel_op("cpu_stream_merge_backward")
def stream_merge_backward(
    grad: Tensor, streams: Tensor, layer_out: Tensor, h_res: Tensor, h_post: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_merge(streams, layer_out, h_res, h_post)
    check_inputs(grad)
    check_shapes((grad, streams.shape))
    grads = tuple(map(torch.empty_like, (streams, layer_out, h_res, h_post)))
    call("stream_merge_backward", grad, streams, layer_out, h_res, h_post, *grads, *streams.shape)
    return grads


@stream_merge_backward.register_fake
def _(grad, streams, layer_out, h_res, h_post) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(map(torch.empty_like, (streams, layer_out, h_res, h_post)))


def _check_sinkhorn(logits: Tensor, iters: int) -> None:
    check_inputs(logits)
    check_iters(iters)
    check(logits.dim() == 3, lambda: f"Sinkhorn takes (M, n, n), got {logits.shape}")
    check_shapes((logits, (logits.shape[0], logits.shape[1], logits.shape[1])))


@kernel_op("cpu_sinkhorn")
def sinkhorn(logits: Tensor, iters: int, form_eps: float) -> Tensor:
    """Sinkhorn-Knopp of (M, n, n) logits (form_eps < 0: the log-space form)."""
    _check_sinkhorn(logits, iters)
    out = torch.empty_like(logits)
    call("sinkhorn_forward", logits, out, *logits.shape[:2], iters, form_eps)
    return out


@sinkhorn.register_fake
def _(logits: Tensor, iters: int, form_eps: float) -> Tensor:
    return torch.empty_like(logits)


@kernel_op("cpu_sinkhorn_backward")
def sinkhorn_backward(logits: Tensor, grad: Tensor, iters: int, form_eps: float) -> Tensor:
    """d logits, the iterations recomputed per block of tokens from the logits."""
    _check_sinkhorn(logits, iters)
    check_inputs(grad)
    check_shapes((grad, logits.shape))
    d_logits = torch.empty_like(logits)
    call("sinkhorn_backward", logits, grad, d_logits, *logits.shape[:2], iters, form_eps)
    return d_logits


@sinkhorn_backward.register_fake
def _(logits: Tensor, grad: Tensor, iters: int, form_eps: float) -> Tensor:
    return torch.empty_like(logits)


@kernel_op("cpu_mhc_tail")
def mhc_tail(
    q: Tensor, a: Tensor, b: Tensor, n: int, iters: int, pre_eps: float, form_eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(H_pre, H_post, H_res) from the projection q (M, K = 2n + n^2), the per-value scale a
    (K,) and bias b (K,): z = a q + b; sigmoid(z) + pre_eps, 2 sigmoid(z), Sinkhorn(z)."""
    _check_tail(q, a, b, n, iters)
    h_pre, h_post, h_res = _tail_outputs(q, n)
    call(
        "mhc_tail_forward", q, a, b, h_pre, h_post, h_res, q.shape[0], n, iters, pre_eps,
        form_eps,
    )  # fmt: skip
    return h_pre, h_post, h_res


def _check_tail(q: Tensor, a: Tensor, b: Tensor, n: int, iters: int) -> None:
    check_inputs(q, a, b)
    check_iters(iters)
    values = 2 * n + n * n
    check_shapes((q, (q.shape[0], values)), (a, (values,)), (b, (values,)))


def _tail_outputs(q: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    tokens = q.shape[0]
    return q.new_empty(tokens, n), q.new_empty(tokens, n), q.new_empty(tokens, n, n)


@mhc_tail.register_fake
def _(q, a, b, n: int, iters: int, pre_eps: float, form_eps: float):
    return _tail_outputs(q, n)


@kernel_op("cpu_mhc_tail_backward")
def mhc_tail_backward(
    q: Tensor,
    a: Tensor,
    b: Tensor,
    d_pre: Tensor | None,
    d_post: Tensor | None,
    d_res: Tensor | None,
    n: int,
    iters: int,
    form_eps: float,
) -> Tensor:
    """The gradient at z = a q + b (M, K) from those of H_pre, H_post, H_res (None: zero)."""
    _check_tail(q, a, b, n, iters)
    check_inputs(d_pre, d_post, d_res)
    tokens = q.shape[0]
    check_shapes((d_pre, (tokens, n)), (d_post, (tokens, n)), (d_res, (tokens, n, n)))
    d_z = torch.empty_like(q)
    call("mhc_tail_backward", q, a, b, d_pre, d_post, d_res, d_z, q.shape[0], n, iters, form_eps)
    return d_z


@mhc_tail_backward.register_fake
def _(q, a, b, d_pre, d_post, d_res, n: int, iters: int, form_eps: float) -> Tensor:
    return torch.empty_like(q)


def _save_inputs(ctx, inputs: tuple, output) -> None:
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None (NULL in C)
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, Tensor)))
    ctx.options = tuple(v for v in inputs if not isinstance(v, Tensor))


# Each op's backward through `backward`: the backward op (registered) or its body (eager).
def _read_grads(backward: Callable) -> Callable:
    return lambda ctx, grad: backward(grad.contiguous(), *ctx.saved_tensors)


def _merge_grads(backward: Callable) -> Callable:
    return lambda ctx, grad: backward(grad.contiguous(), *ctx.saved_tensors)


def _sinkhorn_grads(backward: Callable) -> Callable:
    def grads(ctx, grad: Tensor):
        (logits,) = ctx.saved_tensors
        return backward(logits, grad.contiguous(), *ctx.options), None, None

    return grads


def _tail_grads(backward: Callable) -> Callable:
    def grads(ctx, d_pre, d_post, d_res):
        q, a, b = ctx.saved_tensors
        n, iters, _, form_eps = ctx.options
        grads = [None if g is None else g.contiguous() for g in (d_pre, d_post, d_res)]
        d_z = backward(q, a, b, *grads, n, iters, form_eps)
        return d_z * a, (d_z * q).sum(0), d_z.sum(0), None, None, None, None

    return grads


_stream_read = autograd_paths(
    "StreamRead", stream_read, _save_inputs, _read_grads, stream_read_backward
)
_stream_merge = autograd_paths(
    "StreamMerge", stream_merge, _save_inputs, _merge_grads, stream_merge_backward
)
_sinkhorn_op = autograd_paths(
    "Sinkhorn", sinkhorn, _save_inputs, _sinkhorn_grads, sinkhorn_backward
)
_mhc_tail = autograd_paths("MHCTail", mhc_tail, _save_inputs, _tail_grads, mhc_tail_backward)


@register("mhc_pre", CPU, dtypes=DTYPES)
def mhc_pre(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """The reference's `mhc_pre`, accumulated in float32 and returned in the dtype a matmul of
    the streams runs in (autocast's under autocast)."""
    dtype, (*batch, n, width) = reference._matmul_dtype(streams), streams.shape
    with torch.autocast("cpu", enabled=False):
        rows = float32_contiguous(streams.reshape(-1, n, width))
        out = _stream_read(rows, float32_contiguous(h_pre.reshape(-1, n)))
    return out.view(*batch, width).to(dtype)


@register("mhc_post", CPU, dtypes=DTYPES)
def mhc_post(
    streams: torch.Tensor, layer_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor
) -> torch.Tensor:
    """The reference's `mhc_post` in one pass: the next streams in the streams' dtype."""
    *batch, n, width = streams.shape
    with torch.autocast("cpu", enabled=False):
        merged = _stream_merge(
            float32_contiguous(streams.reshape(-1, n, width)),
            float32_contiguous(layer_out.reshape(-1, width)),
            float32_contiguous(h_res.reshape(-1, n, n)),
            float32_contiguous(h_post.reshape(-1, n)),
        )
    return merged.view(*batch, n, width).to(streams.dtype)


def _sinkhorn(logits: torch.Tensor, iters: int, form_eps: float) -> torch.Tensor:
    n = logits.shape[-1]
    with torch.autocast("cpu", enabled=False):
        out = _sinkhorn_op(float32_contiguous(logits.reshape(-1, n, n)), iters, form_eps)
    return out.view(logits.shape).to(logits.dtype)


@register("sinkhorn_knopp", CPU, dtypes=DTYPES)
def sinkhorn_knopp(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """The reference's log-space Sinkhorn-Knopp, per token in one kernel each way."""
    return _sinkhorn(logits, iters, LOG_SPACE)


@register("sinkhorn_knopp_eps", CPU, dtypes=DTYPES)
def sinkhorn_knopp_eps(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """V4's linear-space Sinkhorn-Knopp, per token in one kernel each way."""
    if eps < 0:
        raise ValueError(f"V4's Sinkhorn eps must be >= 0, got {eps}")
    return _sinkhorn(logits, iters, eps)


@register("mhc_mapping", CPU, dtypes=DTYPES)
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
    n, batch = streams.shape[-2], streams.shape[:-2]
    projected = reference.normalised_projection(streams, weight, norm_eps)
    with torch.autocast("cpu", enabled=False):
        h_pre, h_post, h_res = _mhc_tail(
            projected.reshape(-1, projected.shape[-1]).contiguous(),
            *tail_parameters(alpha, bias_pre, bias_post, bias_res, iters, form_eps),
        )
    return h_pre.view(*batch, n), h_post.view(*batch, n), h_res.view(*batch, n, n)


def tail_parameters(
    alpha: Tensor,
    bias_pre: Tensor,
    bias_post: Tensor,
    bias_res: Tensor,
    iters: int,
    form_eps: float | None,
) -> tuple[Tensor, Tensor, int, int, float, float]:
    """The tail's arguments after the projection: the per-value scale and bias (K,) in float32,
    n, iters, H_pre's eps and Sinkhorn's form (LOG_SPACE for the paper's)."""
    n = bias_pre.shape[0]
    alpha = alpha.float()
    scale = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])
    bias = torch.cat([bias_pre.float(), bias_post.float(), bias_res.float().flatten()])
    if form_eps is None:
        return scale, bias, n, iters, 0.0, LOG_SPACE
    return scale, bias, n, iters, form_eps, form_eps
