"""V4's compressed KV entries on a CPU (the `cpu` backend's `kv_compress`;
kernels/cpu_kv_compress.c): one C pass over each entry's block forward and one backward. The
reference gathers every block's kv and gate into copies (B, E, 2 ratio, dim), concatenates the
previous block's, and runs the softmax, the product and the sum over them, each a pass with
its own backward (about 60 ops per compressor and step at `tiny`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

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
from birkhoff.kernels.v4_attention import fused_entries


def _check(kv: Tensor, gate: Tensor, bias: Tensor, start: Tensor, kind: Tensor, dim: int):
    check_inputs(kv, gate, bias)
    batch, seq, width = kv.shape
    ratio = bias.shape[0]
    check(width in (dim, 2 * dim), lambda: f"kv of width {width} for entries of {dim}")
    check_shapes((gate, kv.shape), (bias, (ratio, width)), (kind, start.shape))
    check(
        start.dtype == torch.int64 and kind.dtype == torch.uint8 and start.shape[0] == batch,
        lambda: "start (B, E) int64 and kind (B, E) uint8",
    )
    used = kind > 0
    # every entry's block (and its previous one, where read) within the row: C trusts them
    inside = (start >= 0) & (start + ratio <= seq) & ((kind < 2) | (start >= ratio))
    check(bool((inside | ~used).all()), lambda: "an entry's block lies outside its row")


def _sizes(kv: Tensor, start: Tensor, dim: int, ratio: int) -> tuple[int, ...]:
    return (*kv.shape[:2], start.shape[1], kv.shape[2], dim, ratio)


@kernel_op("cpu_kv_compress")
def kv_compress_op(
    kv: Tensor, gate: Tensor, bias: Tensor, start: Tensor, kind: Tensor, dim: int
) -> tuple[Tensor, Tensor]:
    """(entries (B, E, dim), lse (B, E, dim)) from kv and gate (B, T, width), bias (ratio,
    width), each entry's first token `start` (B, E) and `kind` (0: none, 1: its block, 2: its
    block and the previous one, read where width = 2 dim); lse the softmax's log-normaliser,
    what the backward keeps."""
    _check(kv, gate, bias, start, kind, dim)
    out = kv.new_empty(*start.shape, dim)
    lse = torch.empty_like(out)
    call(
        "kv_compress_forward", kv, gate, bias, start.contiguous(), kind.contiguous(), out, lse,
        *_sizes(kv, start, dim, bias.shape[0]),
    )  # fmt: skip
    return out, lse


@kv_compress_op.register_fake
def _(kv, gate, bias, start, kind, dim: int) -> tuple[Tensor, Tensor]:
    out = kv.new_empty(*start.shape, dim)
    return out, torch.empty_like(out)


@kernel_op("cpu_kv_compress_backward")
def kv_compress_backward(
    grad: Tensor, kv: Tensor, gate: Tensor, bias: Tensor, start: Tensor, kind: Tensor,
    out: Tensor, lse: Tensor, dim: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of kv, gate and bias from the entries'."""
    _check(kv, gate, bias, start, kind, dim)
    check_inputs(grad, out, lse)
    check_shapes((grad, out.shape), (lse, out.shape), (out, (*start.shape, dim)))
    d_kv, d_gate, d_bias = torch.empty_like(kv), torch.empty_like(gate), torch.empty_like(bias)
    call(
        "kv_compress_backward", grad, kv, gate, bias, start.contiguous(), kind.contiguous(),
        out, lse, d_kv, d_gate, d_bias, *_sizes(kv, start, dim, bias.shape[0]),
    )  # fmt: skip
    return d_kv, d_gate, d_bias


@kv_compress_backward.register_fake
def _(grad, kv, gate, bias, start, kind, out, lse, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(kv), torch.empty_like(gate), torch.empty_like(bias)


def _save(ctx, inputs: tuple, output: tuple) -> None:
    kv, gate, bias, start, kind, ctx.dim = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(kv, gate, bias, start, kind, *output)


def _grads(backward: Callable) -> Callable:
    """The op's backward through `backward`: the backward op (registered) or its body (eager)."""

    def grads(ctx, grad: Tensor, _d_lse):
        kv, gate, bias, start, kind, out, lse = ctx.saved_tensors
        d_kv, d_gate, d_bias = backward(
            grad.contiguous(), kv, gate, bias, start, kind, out, lse, ctx.dim
        )
        return d_kv, d_gate, d_bias, None, None, None

    return grads


_kv_compress = autograd_paths("KVCompress", kv_compress_op, _save, _grads, kv_compress_backward)


@register("kv_compress", CPU, dtypes=DTYPES)
def kv_compress(
    kv: Tensor, gate: Tensor, position_bias: Tensor, start: Tensor, exists: Tensor,
    has_previous: Tensor, overlap: bool,
) -> Tensor:  # fmt: skip
    """The reference's `kv_compress`: computed in float32, returned in kv's dtype."""
    layout = fused_entries(kv, start, exists, has_previous, overlap)
    with torch.autocast("cpu", enabled=False):
        out, _ = _kv_compress(
            float32_contiguous(kv), float32_contiguous(gate), float32_contiguous(position_bias),
            *layout,
        )  # fmt: skip
    return out.to(kv.dtype)
