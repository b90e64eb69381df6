"""Engram's gate and merge on a CPU (the `cpu` backend's `engram_merge`; kernels/cpu_engram.c):
the rows are gathered and projected to the keys and the value by torch (an embedding lookup and
two GEMMs, differentiated by autograd), and everything after them, the gate, the gated value,
its RMSNorm, the causal convolution, the SiLU and the sum with the streams, is one C pass over
the tokens forward and two backward. The reference's composition passes over stream-sized
tensors a dozen times each way (the gated value, its norm, each lag of the convolution, the
SiLU, two sums, and each of their gradients); the gated and normalised values are a scalar
times the value per token and stream, so the C passes never form them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from birkhoff.kernels import reference
from birkhoff.kernels.cpu_gather import gather_rows
from birkhoff.kernels.cpu_library import (
    DTYPES,
    autograd_paths,
    call,
    check,
    check_inputs,
    check_shapes,
    float32_contiguous,
    kernel_op,
)
from birkhoff.kernels.registry import CPU, register

STATS = 5  # per token and stream: alpha, 1/rms of the gated value, of h, of k, <h', k'>


def _check_merge(
    streams: Tensor, keys: Tensor, value: Tensor, norm_weight: Tensor, conv_weight: Tensor,
    dilation: int,
) -> None:  # fmt: skip
    check_inputs(streams, keys, value, norm_weight, conv_weight)
    check(streams.dim() == 4, lambda: f"the merge takes streams (B, T, n, C), got {streams.shape}")
    seqs, length, _, width = streams.shape
    check(
        conv_weight.dim() == 2 and conv_weight.shape[0] >= 1 and dilation >= 1,
        lambda: (
            f"the convolution takes (lags >= 1, C) and dilation >= 1, got "
            f"{tuple(conv_weight.shape)} and {dilation}"
        ),
    )
    check_shapes(
        (keys, streams.shape),
        (value, (seqs, length, width)),
        (norm_weight, (width,)),
        (conv_weight, (conv_weight.shape[0], width)),
    )


def _sizes(streams: Tensor, conv_weight: Tensor, dilation: int) -> tuple[int, ...]:
    return (*streams.shape, conv_weight.shape[0], dilation)


@kernel_op("cpu_engram_merge")
def engram_merge_op(
    streams: Tensor,
    keys: Tensor,
    value: Tensor,
    norm_weight: Tensor,
    conv_weight: Tensor,
    dilation: int,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """(out, stats) for streams and keys (B, T, n, C), value (B, T, C), the norm's weight (C,)
    and the convolution's (lags, C): out = streams + g + SiLU(Conv(RMSNorm(g))) with g the
    value gated per stream (the reference's engram_merge after its projections); stats (B, T,
    n, 5) is what the backward keeps (no gradient flows through it)."""
    _check_merge(streams, keys, value, norm_weight, conv_weight, dilation)
    out, stats = torch.empty_like(streams), streams.new_empty(*streams.shape[:-1], STATS)
    call(
        "engram_merge_forward", streams, keys, value, norm_weight, conv_weight, out, stats,
        *_sizes(streams, conv_weight, dilation), eps,
    )  # fmt: skip
    return out, stats


@engram_merge_op.register_fake
def _(streams, keys, value, norm_weight, conv_weight, dilation: int, eps: float):
    return torch.empty_like(streams), streams.new_empty(*streams.shape[:-1], STATS)


@kernel_op("cpu_engram_merge_backward")
def engram_merge_backward(
    grad: Tensor,
    streams: Tensor,
    keys: Tensor,
    value: Tensor,
    norm_weight: Tensor,
    conv_weight: Tensor,
    stats: Tensor,
    dilation: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of streams, keys, value, the norm's weight and the convolution's. All
    five come from the same two passes, so all are computed. It has no gradient itself (no
    double backward)."""
    _check_merge(streams, keys, value, norm_weight, conv_weight, dilation)
    check_inputs(grad, stats)
    check_shapes((grad, streams.shape), (stats, (*streams.shape[:-1], STATS)))
    grads = tuple(map(torch.empty_like, (streams, keys, value, norm_weight, conv_weight)))
    scratch = torch.empty_like(streams)  # dz: dout SiLU'(z), read back at earlier tokens
    call(
        "engram_merge_backward", grad, streams, keys, value, norm_weight, conv_weight, stats,
        scratch, *grads, *_sizes(streams, conv_weight, dilation),
    )  # fmt: skip
    return grads


@engram_merge_backward.register_fake
def _(grad, streams, keys, value, norm_weight, conv_weight, stats, dilation: int):
    return tuple(map(torch.empty_like, (streams, keys, value, norm_weight, conv_weight)))


def _save(ctx, inputs: tuple, output: tuple) -> None:
    *tensors, dilation, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*tensors, output[1])
    ctx.dilation = dilation


def _grads(backward: Callable) -> Callable:
    """The op's backward through `backward`: the backward op (registered) or its body (eager)."""

    def grads(ctx, grad: Tensor, _d_stats):
        *tensors, stats = ctx.saved_tensors
        grads = backward(grad.contiguous(), *tensors, stats, ctx.dilation)
        needed = ctx.needs_input_grad[: len(grads)]
        return *(g if need else None for g, need in zip(grads, needed, strict=True)), None, None

    return grads


_engram_merge = autograd_paths("EngramMerge", engram_merge_op, _save, _grads, engram_merge_backward)


@register("engram_merge", CPU, dtypes=DTYPES)
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
    """The reference's `engram_merge` (same arguments and results; streams (B, T, n, C)),
    computed in float32 after the projections, out returned in the streams' dtype."""
    if streams.numel() == 0:  # no token: nothing to fuse
        return reference.engram_merge(
            table, indices, key_weight, value_weight, streams, norm_weight, conv_weight,
            dilation, eps,
        )  # fmt: skip
    # the rows by the C gather, whose backward adds them back in index order as index_add
    # does (kernels/cpu_gather.py); a table in another dtype (FSDP's bf16) by index_select,
    # whose backward is that index_add (F.embedding's sorts the indices first: 3x slower)
    flat = indices.flatten().to(torch.int64)
    if table.dtype == torch.float32 and table.is_contiguous():
        rows = gather_rows(table, flat.contiguous())
    else:
        rows = table.index_select(0, flat)
    memory = rows.view(*indices.shape[:-1], -1)
    keys, value = F.linear(memory, key_weight), F.linear(memory, value_weight)
    with torch.autocast("cpu", enabled=False):
        out, stats = _engram_merge(
            float32_contiguous(streams),
            float32_contiguous(keys.view(streams.shape)),
            float32_contiguous(value),
            float32_contiguous(norm_weight),
            float32_contiguous(conv_weight),
            dilation,
            eps,
        )
    return out.to(streams.dtype), stats[..., 0]  # the stats' first float: alpha
