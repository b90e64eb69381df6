"""One sublayer's merge and the next hyper-connection's read as one op on a CPU (the `cpu`
backend's `mhc_merge_read`; kernels/cpu_mhc_read.c). Inside a block the attention's merge
H_res x + H_post^T y is written 16 tokens at a time and the FFN's read (its projection, 1/rms,
tail and H_pre x) taken on those merged streams while they are in cache; backward, the read's
gradient of the merged streams stays in a thread's scratch and the merge's backward takes it
from there. As two ops (`mhc_post`, then `mhc_read`) the merged streams are written and read
back from memory, and backward their gradient is too.

Float32 streams only: the model keeps its residual in float32 (autocast leaves it so). Other
streams (FSDP's bf16 parameters) take the cpu backend's `mhc_post` and then its `mhc_read`,
which read the merged streams as the reference does, rounded to the streams' dtype.
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
    check_inputs,
    check_shapes,
    kernel_op,
)
from birkhoff.kernels.cpu_library import float32_contiguous as f32
from birkhoff.kernels.cpu_mhc import check_merge, mhc_post
from birkhoff.kernels.cpu_mhc_read import (
    backward_scratch,
    check_read,
    mhc_read,
    read_arguments,
    read_outputs,
    read_results,
)
from birkhoff.kernels.registry import CPU, register

_composed = reference.composed_merge_read(mhc_post, mhc_read)


@kernel_op("cpu_mhc_merge_read")
def merge_read_op(
    streams: Tensor,
    layer_out: Tensor,
    h_res: Tensor,
    h_post: Tensor,
    weight: Tensor,
    a: Tensor,
    b: Tensor,
    norm_eps: float,
    iters: int,
    pre_eps: float,
    form_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The merged streams m = H_res x + H_post^T y (M, n, C) of streams x, the sublayer's
    output y (M, C), H_res (M, n, n) and H_post (M, n); then `cpu_mhc_read` of m with the next
    connection's weight, scale a and bias b: (H_pre m, its H_post, its H_res, q, 1/rms, m)."""
    check_merge(streams, layer_out, h_res, h_post)
    check_read(streams, weight, a, b, iters)
    tokens, n, width = streams.shape
    layer_in, h_post_next, h_res_next, q = read_outputs(streams)
    h_pre, rinv, merged = (
        streams.new_empty(tokens, n),
        streams.new_empty(tokens),
        torch.empty_like(streams),
    )
    call(
        "mhc_merge_read_forward", streams, layer_out, h_res, h_post, weight, a, b, merged, q,
        rinv, layer_in, h_pre, h_post_next, h_res_next, tokens, n, width, norm_eps, iters,
        pre_eps, form_eps,
    )  # fmt: skip
    return layer_in, h_post_next, h_res_next, q, rinv, merged


@merge_read_op.register_fake
def _(streams, layer_out, h_res, h_post, weight, a, b, norm_eps, iters, pre_eps, form_eps):
    tokens = streams.shape[0]
    return (*read_outputs(streams), streams.new_empty(tokens), torch.empty_like(streams))


@kernel_op("cpu_mhc_merge_read_backward")
def merge_read_backward(
    streams: Tensor,
    layer_out: Tensor,
    h_res: Tensor,
    h_post: Tensor,
    merged: Tensor,
    weight: Tensor,
    q: Tensor,
    rinv: Tensor,
    a: Tensor,
    b: Tensor,
    d_layer_in: Tensor,
    d_post: Tensor | None,
    d_res: Tensor | None,
    d_merged: Tensor | None,
    iters: int,
    pre_eps: float,
    form_eps: float,
    need_weight: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of streams, layer_out, h_res, h_post, weight, a and b from those of the
    read's outputs (d_post, d_res: None for zero) and of the merged streams from elsewhere
    (d_merged, the next merge's; None: none); the weight's empty where not needed."""
    check_merge(streams, layer_out, h_res, h_post)
    check_read(streams, weight, a, b, iters)
    check_inputs(merged, q, rinv, d_layer_in, d_post, d_res, d_merged)
    tokens, n, width = streams.shape
    check_shapes(
        (merged, streams.shape), (q, (tokens, 2 * n + n * n)), (rinv, (tokens,)),
        (d_layer_in, (tokens, width)), (d_post, (tokens, n)), (d_res, (tokens, n, n)),
        (d_merged, streams.shape),
    )  # fmt: skip
    grads = tuple(map(torch.empty_like, (streams, layer_out, h_res, h_post)))
    d_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    scratch = backward_scratch(streams, q)
    call(
        "mhc_merge_read_backward", streams, layer_out, h_res, h_post, *grads, merged, q, rinv,
        a, b, d_layer_in, d_post, d_res, weight, d_merged, *scratch,
        d_weight if need_weight else None, tokens, n, width, iters, pre_eps, form_eps,
    )  # fmt: skip
    d_z = scratch[1]  # the gradient at z = a q + b: a's and b's
    return *grads, d_weight, (d_z * q).sum(0), d_z.sum(0)


@merge_read_backward.register_fake
def _(streams, layer_out, h_res, h_post, merged, weight, q, rinv, a, b, d_layer_in, d_post,
      d_res, d_merged, iters, pre_eps, form_eps, need_weight=True):  # fmt: skip
    grads = tuple(map(torch.empty_like, (streams, layer_out, h_res, h_post)))
    d_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    return *grads, d_weight, torch.empty_like(a), torch.empty_like(b)


def _save(ctx, inputs: tuple, output: tuple) -> None:
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None (NULL in C)
    streams, layer_out, h_res, h_post, weight, a, b, _, iters, pre_eps, form_eps = inputs
    _, _, _, q, rinv, merged = output
    ctx.mark_non_differentiable(q, rinv)
    ctx.save_for_backward(streams, layer_out, h_res, h_post, merged, weight, q, rinv, a, b)
    ctx.options = (iters, pre_eps, form_eps)


def _grads(backward: Callable) -> Callable:
    """The op's backward through `backward`: the backward op (registered) or its body (eager)."""

    def grads(ctx, d_layer_in, d_post, d_res, _d_q, _d_rinv, d_merged) -> tuple:
        saved = ctx.saved_tensors
        if d_layer_in is None:  # the sublayer's input unused: only the mappings' gradients flow
            d_layer_in = saved[1].new_zeros(saved[1].shape)  # as the merge's sublayer output
        grads = [None if g is None else f32(g) for g in (d_layer_in, d_post, d_res, d_merged)]
        need_weight = ctx.needs_input_grad[4]
        *merge_grads, d_weight, d_a, d_b = backward(*saved, *grads, *ctx.options, need_weight)
        return *merge_grads, d_weight if need_weight else None, d_a, d_b, None, None, None, None

    return grads


_merge_read = autograd_paths("MergeRead", merge_read_op, _save, _grads, merge_read_backward)


@register("mhc_merge_read", CPU, dtypes=DTYPES)
def mhc_merge_read(
    streams: torch.Tensor,
    layer_out: torch.Tensor,
    h_res: torch.Tensor,
    h_post: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    bias_pre: torch.Tensor,
    bias_post: torch.Tensor,
    bias_res: torch.Tensor,
    norm_eps: float,
    iters: int,
    form_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's `mhc_merge_read` in one op each way for float32 streams: the next
    sublayer's input in the dtype a matmul of the streams runs in, its H_post and H_res, and
    the merged streams (for the next merge, whose gradient of them joins this backward)."""
    args = (streams, layer_out, h_res, h_post, weight, alpha, bias_pre, bias_post, bias_res)
    if streams.dtype != torch.float32:
        return _composed(*args, norm_eps, iters, form_eps)
    n, width = streams.shape[-2:]
    with torch.autocast("cpu", enabled=False):
        *outputs, _, _, merged = _merge_read(
            f32(streams.reshape(-1, n, width)),
            f32(layer_out.reshape(-1, width)),
            f32(h_res.reshape(-1, n, n)),
            f32(h_post.reshape(-1, n)),
            *read_arguments(*args[4:], norm_eps, iters, form_eps),
        )
    return *read_results(*outputs, streams), merged.view(streams.shape)
