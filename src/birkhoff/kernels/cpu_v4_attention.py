"""DeepSeek-V4's attention core on a CPU (the `cpu` backend's `v4_attention`;
kernels/cpu_v4_attention.c): one C pass over the queries forward and one backward, each query
with all its heads against its window, its compressed entries and the sinks. The reference
computes blocks of queries against two blocks of keys (half of them masked), concatenates
the window's, the entries' and the sinks' logits and keeps the probabilities for backward;
here nothing larger than one query's logits is formed, and the backward recomputes them from
the normaliser (`lse`), as flash attention does.

The compressed entries a query sees are handed to C as a list of indices per query, -1 where
none: HCA's (and CSA's dense warm-up) every visible entry, CSA's its visible picks.
"""

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
from birkhoff.kernels.v4_attention import EntryKV


def _check(
    q: Tensor, kv: Tensor, entries: Tensor, index: Tensor, positions: Tensor, sinks: Tensor,
    window: int,
) -> None:  # fmt: skip
    check_inputs(q, kv, entries, sinks)
    check(q.dim() == 4, lambda: f"the cpu v4_attention takes q (B, T, H, D), got {q.shape}")
    batch, seq, heads, dim = q.shape
    check(window >= 1, lambda: f"the window must be at least 1 token, got {window}")
    check(
        entries.dim() == 3 and index.dim() == 3,
        lambda: f"entries (B, E, D) and index (B, T, K), got {entries.shape}, {index.shape}",
    )
    for name, tensor in (("index", index), ("positions", positions)):
        check(
            tensor.dtype == torch.int64 and tensor.is_contiguous(),
            lambda t=tensor, n=name: f"{n}: contiguous int64, got {t.dtype}",
        )
    if index.numel():  # the kernel reads rows 0 .. E - 1 of the entries; -1: none
        check(
            bool(((index >= -1) & (index < entries.shape[1])).all()),
            lambda: f"index: entries -1 .. {entries.shape[1] - 1}, got others",
        )
    check_shapes(
        (kv, (batch, seq, dim)),
        (entries, (batch, entries.shape[1], dim)),
        (index, (batch, seq, index.shape[2])),
        (positions, (batch, seq)),
        (sinks, (heads,)),
    )


def _sizes(q: Tensor, entries: Tensor, index: Tensor, window: int) -> tuple[int, ...]:
    return (*q.shape, entries.shape[1], index.shape[2], window)


@kernel_op("cpu_v4_attention")
def v4_attention_op(
    q: Tensor, kv: Tensor, entries: Tensor, index: Tensor, positions: Tensor, sinks: Tensor,
    window: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(out (B, T, H, D), lse (B, T, H)): each query's softmax over its window (kv (B, T, D),
    `positions` in documents (B, T)), its entries (rows of `entries` (B, E, D) listed in
    `index` (B, T, K), -1: none) and the sinks (H,); lse the log of its normaliser."""
    _check(q, kv, entries, index, positions, sinks, window)
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3])
    call(
        "v4_attention_forward", q, kv, entries, index, positions, sinks, out, lse,
        *_sizes(q, entries, index, window),
    )  # fmt: skip
    return out, lse


@v4_attention_op.register_fake
def _(q, kv, entries, index, positions, sinks, window: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), q.new_empty(q.shape[:3])


@kernel_op("cpu_v4_attention_backward")
def v4_attention_backward(
    grad: Tensor, q: Tensor, kv: Tensor, entries: Tensor, index: Tensor, positions: Tensor,
    sinks: Tensor, out: Tensor, lse: Tensor, window: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of q, kv, entries and sinks from out's."""
    _check(q, kv, entries, index, positions, sinks, window)
    check_inputs(grad, out, lse)
    check_shapes((grad, q.shape), (out, q.shape), (lse, q.shape[:3]))
    grads = (torch.empty_like(q), torch.empty_like(kv), torch.empty_like(entries))
    d_sinks = torch.empty_like(sinks)
    call(
        "v4_attention_backward", grad, q, kv, entries, index, positions, sinks, out, lse,
        *grads, d_sinks, *_sizes(q, entries, index, window),
    )  # fmt: skip
    return (*grads, d_sinks)


@v4_attention_backward.register_fake
def _(grad, q, kv, entries, index, positions, sinks, out, lse, window: int):
    return (
        torch.empty_like(q),
        torch.empty_like(kv),
        torch.empty_like(entries),
        sinks.new_empty(sinks.shape),
    )


def _save(ctx, inputs: tuple, output: tuple) -> None:
    q, kv, entries, index, positions, sinks, window = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.window = window
    ctx.save_for_backward(q, kv, entries, index, positions, sinks, *output)


def _grads(backward: Callable) -> Callable:
    """The op's backward through `backward`: the backward op (registered) or its body (eager)."""

    def grads(ctx, grad: Tensor, _d_lse):
        q, kv, entries, index, positions, sinks, out, lse = ctx.saved_tensors
        d_q, d_kv, d_entries, d_sinks = backward(
            grad.contiguous(), q, kv, entries, index, positions, sinks, out, lse, ctx.window
        )
        return d_q, d_kv, d_entries, None, None, d_sinks, None

    return grads


_v4_attention = autograd_paths("V4Attention", v4_attention_op, _save, _grads, v4_attention_backward)


def entry_lists(q: Tensor, positions: Tensor, entries: EntryKV | None) -> tuple[Tensor, Tensor]:
    """The entries' rows (B, E, D) and each query's list of them (B, T, K) int64, -1 where
    none: every visible entry (HCA, CSA's dense warm-up) or the visible picks (CSA)."""
    batch, seq, _, dim = q.shape
    if entries is None:
        return q.new_empty(batch, 0, dim), positions.new_empty(batch, seq, 0, dtype=torch.long)
    values = entries.values
    if entries.picks is None:
        seen = entries.layout.visible(positions)
        every = torch.arange(values.shape[1], device=q.device)
        return values, torch.where(seen, every, -1)
    return values, entries.picks.masked_fill(~entries.picked, -1)


@register("v4_attention", CPU, dtypes=DTYPES)
def v4_attention(
    q: Tensor,
    kv: Tensor,
    positions: Tensor,
    sinks: Tensor,
    window: int,
    entries: EntryKV | None = None,
) -> tuple[Tensor, Tensor]:
    """The reference's `v4_attention`: computed in float32, out in kv's dtype (autocast's,
    as the reference's products give, where it is on), lse float32."""
    values, index = entry_lists(q, positions, entries)
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast else kv.dtype
    with torch.autocast("cpu", enabled=False):
        out, lse = _v4_attention(
            float32_contiguous(q), float32_contiguous(kv), float32_contiguous(values),
            index.contiguous(), positions.to(torch.int64).contiguous(),
            float32_contiguous(sinks), window,
        )  # fmt: skip
    return out.to(dtype), lse
