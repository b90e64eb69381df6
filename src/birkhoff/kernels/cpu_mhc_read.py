"""mHC's mappings and stream read as one op on a CPU (the `cpu` backend's `mhc_read`;
kernels/cpu_mhc_read.c): everything a hyper-connection computes before its sublayer (the
projection of the streams, 1/rms, the scales, biases, sigmoids, Sinkhorn and the read H_pre x)
is one C pass over blocks of 16 tokens while their streams are in cache, and the backward one
more (the tail's gradient, then the streams' and the projection weight's gradients on register
tiles). The op also hands back the streams for the merge, through an autograd Function, so
that the merge's gradient of them reaches this backward and is added in the pass that writes
the streams' gradient: otherwise autograd sums the two in a pass of its own. The separate ops
pass over the streams for the projection, the norm, the read, each of their gradients and
the sums.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from birkhoff.kernels import mhc_reference as reference
from birkhoff.kernels.cpu_library import (
    DTYPES,
    call,
    check,
    check_inputs,
    check_iters,
    check_shapes,
    float32_contiguous,
    kernel_op,
)
from birkhoff.kernels.cpu_mhc import tail_parameters
from birkhoff.kernels.registry import CPU, register


def check_read(streams: Tensor, weight: Tensor, a: Tensor, b: Tensor, iters: int) -> None:
    check_inputs(streams, weight, a, b)
    check_iters(iters)
    check(streams.dim() == 3, lambda: f"the read takes (M, n, C), got {streams.shape}")
    n, width = streams.shape[1:]
    values = 2 * n + n * n
    check_shapes((weight, (values, n * width)), (a, (values,)), (b, (values,)))


def read_arguments(
    weight: Tensor,
    alpha: Tensor,
    bias_pre: Tensor,
    bias_post: Tensor,
    bias_res: Tensor,
    norm_eps: float,
    iters: int,
    form_eps: float | None,
) -> tuple:
    """What the C read takes after the streams, from the registry op's arguments: the weight in
    float32, the tail's scale and bias, the norm's eps, iters, H_pre's eps and the form."""
    scale, bias, _, iters, pre_eps, form = tail_parameters(
        alpha, bias_pre, bias_post, bias_res, iters, form_eps
    )
    return float32_contiguous(weight), scale, bias, norm_eps, iters, pre_eps, form


def read_results(
    layer_in: Tensor, h_post: Tensor, h_res: Tensor, streams: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The C read's outputs (rows of tokens) in the streams' batch shape, the sublayer's input
    in the dtype a matmul of the streams runs in."""
    *batch, n, width = streams.shape
    dtype = reference._matmul_dtype(streams)
    return layer_in.view(*batch, width).to(dtype), h_post.view(*batch, n), h_res.view(*batch, n, n)


def backward_scratch(streams: Tensor, q: Tensor) -> tuple[Tensor, ...]:
    """The C backward's per-token scratch, in its order: d_pre (M, n), dz and g (M, K), c (M,)
    and h_pre (M, n)."""
    tokens, n = streams.shape[:2]
    new = streams.new_empty
    return new(tokens, n), torch.empty_like(q), torch.empty_like(q), new(tokens), new(tokens, n)


def read_outputs(streams: Tensor) -> tuple[Tensor, ...]:
    tokens, n, width = streams.shape
    new = streams.new_empty
    return new(tokens, width), new(tokens, n), new(tokens, n, n), new(tokens, 2 * n + n * n)


@kernel_op("cpu_mhc_read")
def mhc_read_op(
    streams: Tensor,
    weight: Tensor,
    a: Tensor,
    b: Tensor,
    norm_eps: float,
    iters: int,
    pre_eps: float,
    form_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(H_pre x (M, C), H_post (M, n), H_res (M, n, n), q (M, K), 1/rms (M,)) of streams x
    (M, n, C) with the projection weight (K = 2n + n^2, n C) and the tail's per-value scale
    and bias (K,): q = vec(x) W^T / rms(vec(x)), the mappings of z = a q + b as `cpu_mhc_tail`.
    q and 1/rms are what the backward keeps (no gradient flows through them)."""
    check_read(streams, weight, a, b, iters)
    tokens, n, width = streams.shape
    layer_in, h_post, h_res, q = read_outputs(streams)
    h_pre, rinv = streams.new_empty(tokens, n), streams.new_empty(tokens)
    call(
        "mhc_read_forward", streams, weight, a, b, q, rinv, layer_in, h_pre, h_post, h_res,
        tokens, n, width, norm_eps, iters, pre_eps, form_eps,
    )  # fmt: skip
    return layer_in, h_post, h_res, q, rinv


@mhc_read_op.register_fake
def _(streams, weight, a, b, norm_eps: float, iters: int, pre_eps: float, form_eps: float):
    return (*read_outputs(streams), streams.new_empty(streams.shape[0]))


@kernel_op("cpu_mhc_read_backward")
def mhc_read_backward(
    streams: Tensor,
    weight: Tensor,
    q: Tensor,
    rinv: Tensor,
    a: Tensor,
    b: Tensor,
    d_layer_in: Tensor,
    d_post: Tensor | None,
    d_res: Tensor | None,
    iters: int,
    pre_eps: float,
    form_eps: float,
    need_streams: bool = True,
    need_weight: bool = True,
    d_merge: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of streams, weight, a and b from those of H_pre x, H_post and H_res
    (None: zero); the streams' or the weight's empty where not needed (a frozen input's tiles do
    not run). d_merge, a gradient of the streams from elsewhere (the merge's), is added into
    theirs."""
    check_read(streams, weight, a, b, iters)
    check_inputs(q, rinv, d_layer_in, d_post, d_res, d_merge)
    tokens, n, width = streams.shape
    check_shapes(
        (q, (tokens, 2 * n + n * n)), (rinv, (tokens,)), (d_layer_in, (tokens, width)),
        (d_post, (tokens, n)), (d_res, (tokens, n, n)), (d_merge, streams.shape),
    )  # fmt: skip
    d_streams = torch.empty_like(streams) if need_streams else streams.new_empty(0)
    d_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    scratch = backward_scratch(streams, q)
    call(
        "mhc_read_backward", streams, q, rinv, a, b, d_layer_in, d_post, d_res, weight, d_merge,
        *scratch, d_streams if need_streams else None,
        d_weight if need_weight else None, tokens, n, width, iters, pre_eps, form_eps,
    )  # fmt: skip
    d_z = scratch[1]  # the gradient at z = a q + b: a's and b's
    return d_streams, d_weight, (d_z * q).sum(0), d_z.sum(0)


@mhc_read_backward.register_fake
def _(streams, weight, q, rinv, a, b, d_layer_in, d_post, d_res, iters, pre_eps, form_eps,
      need_streams=True, need_weight=True, d_merge=None):  # fmt: skip
    d_streams = torch.empty_like(streams) if need_streams else streams.new_empty(0)
    d_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    return d_streams, d_weight, torch.empty_like(a), torch.empty_like(b)


def _save(ctx, inputs: tuple, output: tuple) -> None:
    ctx.set_materialize_grads(False)  # an unused mapping's gradient stays None (NULL in C)
    streams, weight, a, b, _, iters, pre_eps, form_eps = inputs
    ctx.save_for_backward(streams, weight, output[3], output[4], a, b)
    ctx.options = (iters, pre_eps, form_eps)


def _grads(ctx, backward: Callable, d_layer_in, d_post, d_res, d_merge=None) -> tuple:
    """The op's backward through `backward`: the backward op (registered) or its body (eager)."""
    streams, weight, q, rinv, a, b = ctx.saved_tensors
    if d_layer_in is None:  # the sublayer's input unused: only the mappings' gradients flow
        d_layer_in = streams.new_zeros(streams.shape[0], streams.shape[2])
    grads = [None if g is None else float32_contiguous(g) for g in (d_layer_in, d_post, d_res)]
    need_streams, need_weight = ctx.needs_input_grad[:2]
    # (the streams frozen, the weight not: the merge's gradient of them is not needed)
    d_merge = float32_contiguous(d_merge) if d_merge is not None and need_streams else None
    d_streams, d_weight, d_a, d_b = backward(
        streams, weight, q, rinv, a, b, *grads, *ctx.options, need_streams, need_weight, d_merge
    )
    d_streams, d_weight = (d_streams if need_streams else None), (d_weight if need_weight else None)
    return d_streams, d_weight, d_a, d_b, None, None, None, None


def _save_op(ctx, inputs: tuple, output: tuple) -> None:
    ctx.mark_non_differentiable(output[3], output[4])
    _save(ctx, inputs, output)


def _op_grads(ctx, d_layer_in, d_post, d_res, _d_q, _d_rinv) -> tuple:
    return _grads(ctx, mhc_read_backward, d_layer_in, d_post, d_res)


mhc_read_op.register_autograd(_op_grads, setup_context=_save_op)


class _ReadPassingStreams(torch.autograd.Function):
    """`mhc_read_op`'s body that also returns its streams, for the merge to take: the merge's
    gradient of them then reaches this backward, whose one pass writing d_streams adds it
    (where both ops take the streams, autograd sums their two gradients in a pass of its own).
    The bodies, not the ops: see kernels/cpu_library.py."""

    @staticmethod
    def forward(ctx, streams, weight, a, b, norm_eps, iters, pre_eps, form_eps):
        inputs = (streams, weight, a, b, norm_eps, iters, pre_eps, form_eps)
        outputs = mhc_read_op.body(*inputs)
        _save(ctx, inputs, outputs)
        return *outputs[:3], streams  # returned as it is: autograd makes it a view

    @staticmethod
    @once_differentiable
    def backward(ctx, d_layer_in, d_post, d_res, d_merge):
        return _grads(ctx, mhc_read_backward.body, d_layer_in, d_post, d_res, d_merge)


@register("mhc_read", CPU, dtypes=DTYPES)
def mhc_read(
    streams: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    bias_pre: torch.Tensor,
    bias_post: torch.Tensor,
    bias_res: torch.Tensor,
    norm_eps: float,
    iters: int,
    form_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's `mhc_read` (its `mhc_mapping`, then `mhc_pre`) in one op each way: the
    sublayer's input in the dtype a matmul of the streams runs in, H_post and H_res in
    float32, and the streams for the merge: float32 and contiguous, through the read's node
    (the merge's gradient of them joins the read's in its backward pass); else the streams
    themselves (the read ran on a float32 copy: passing that would add a cast each way), as
    compiled code always returns them (inductor's code sums the two gradients)."""
    args = (streams, weight, alpha, bias_pre, bias_post, bias_res, norm_eps, iters, form_eps)
    rows = float32_contiguous(streams.reshape(-1, *streams.shape[-2:]))
    if torch.compiler.is_compiling():  # the custom op; autograd sums the streams' gradients
        with torch.autocast("cpu", enabled=False):
            outputs = mhc_read_op(rows, *read_arguments(*args[1:]))
        return *read_results(*outputs[:3], streams), streams
    with torch.autocast("cpu", enabled=False):
        outputs = _ReadPassingStreams.apply(rows, *read_arguments(*args[1:]))
    passed = outputs[3].view(streams.shape) if rows.data_ptr() == streams.data_ptr() else streams
    return *read_results(*outputs[:3], streams), passed
