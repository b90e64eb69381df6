"""MoE token permutation as Triton kernels (the `triton` backend): `moe_permute` copies each
token to its k expert slots, `moe_unpermute` merges each token's k expert outputs back with
its gate weights, forward and backward, one program per row.

Both directions read rows through the permutation and its inverse (slot -> row), so no
kernel adds into a row another program writes: the gradient of a token is the sum of its k
rows read in a fixed order, where the reference's autograd scatters them with atomic adds
(index_put / index_add: on CUDA nondeterministic in floating point). The unpermute reads
each expert output once and writes the merged token once, the gate weights applied on the
way (the reference writes a weighted copy of all N k rows, then adds it into zeros), and
its backward gives the expert outputs' and the gate weights' gradients in one pass. The
expert order itself (a stable sort of the flat expert ids) and the counts stay in torch.
Sums are in float32, each tensor stored in its own dtype; semantics are the reference's
(kernels/reference.py), which the tests compare against under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from birkhoff.kernels.reference import tokens_per_expert
from birkhoff.kernels.registry import register

BLOCK_C = 128
BLOCK_ROWS = 1024  # rows a program of _invert inverts


@triton.jit
def _slots(inverse_ptr, token, K: tl.constexpr, KP: tl.constexpr):
    """The permuted rows holding a token's k copies (padded to KP), and their mask."""
    j = tl.arange(0, KP)
    on = j < K
    return tl.load(inverse_ptr + token * K + j, mask=on, other=0), on


@triton.jit
def _gather_rows(
    src_ptr, order_ptr, out_ptr, inverse_ptr, C, K: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """permuted[r] = tokens[order[r] // k]; and inverse[order[r]] = r (for the backward)."""
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows x C passes 2^31
    slot = tl.load(order_ptr + row)
    tl.store(inverse_ptr + slot, row)
    token = slot // K
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < C
        x = tl.load(src_ptr + token * C + cols, mask=inside)
        tl.store(out_ptr + row * C + cols, x, mask=inside)


@triton.jit
def _weighted_sum(
    rows_ptr, inverse_ptr, w_ptr, out_ptr, C, K: tl.constexpr, KP: tl.constexpr,
    WEIGHTED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out[n] = sum_j w[n, j] rows[inverse[n k + j]] (w = 1 when not WEIGHTED): the
    unpermute's forward, and the permute's backward."""
    token = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tokens x top-k x C passes 2^31
    slots, on = _slots(inverse_ptr, token, K, KP)
    if WEIGHTED:
        w = tl.load(w_ptr + token * K + tl.arange(0, KP), mask=on, other=0.0).to(tl.float32)
    else:
        w = on.to(tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < C
        both = on[:, None] & inside[None, :]
        x = tl.load(rows_ptr + slots[:, None] * C + cols[None, :], mask=both, other=0.0)
        out = tl.sum(w[:, None] * x.to(tl.float32), axis=0)
        tl.store(out_ptr + token * C + cols, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _unpermute_backward(
    rows_ptr, inverse_ptr, w_ptr, g_ptr, drows_ptr, dw_ptr, C,
    K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """d rows[inverse[n k + j]] = w[n, j] g[n]; d w[n, j] = <g[n], rows[inverse[n k + j]]>."""
    token = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tokens x top-k x C passes 2^31
    slots, on = _slots(inverse_ptr, token, K, KP)
    w = tl.load(w_ptr + token * K + tl.arange(0, KP), mask=on, other=0.0).to(tl.float32)
    dw = tl.zeros((KP,), dtype=tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < C
        both = on[:, None] & inside[None, :]
        where = slots[:, None] * C + cols[None, :]
        x = tl.load(rows_ptr + where, mask=both, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + token * C + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(drows_ptr + where, (w[:, None] * g[None, :]).to(drows_ptr.dtype.element_ty),
                 mask=both)  # fmt: skip
        dw += tl.sum(x * g[None, :], axis=1)
    tl.store(dw_ptr + token * K + tl.arange(0, KP), dw.to(dw_ptr.dtype.element_ty), mask=on)


@triton.jit
def _invert(order_ptr, inverse_ptr, total, BLOCK: tl.constexpr):
    """inverse[order[r]] = r for BLOCK rows r."""
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = row < total
    tl.store(inverse_ptr + tl.load(order_ptr + row, mask=inside, other=0), row, mask=inside)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """slot -> permuted row: the inverse permutation of `order` (permuted row -> slot), one
    launch (arange and index_put were two)."""
    inverse = torch.empty_like(order)
    if order.numel():
        _invert[(triton.cdiv(order.numel(), BLOCK_ROWS),)](
            order, inverse, order.numel(), BLOCK=BLOCK_ROWS
        )
    return inverse


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
        tokens = tokens.contiguous()
        channels = tokens.shape[-1]
        out = tokens.new_empty((order.numel(), channels))
        inverse = torch.empty_like(order)  # written by the same kernel: the backward's
        if order.numel():
            _gather_rows[(order.numel(),)](
                tokens, order, out, inverse, channels, K=top_k, BLOCK=BLOCK_C
            )
        ctx.top_k, ctx.num_tokens = top_k, tokens.shape[0]
        ctx.save_for_backward(inverse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        k, channels = ctx.top_k, grad.shape[-1]
        d_tokens = grad.new_empty((ctx.num_tokens, channels))
        _weighted_sum[(ctx.num_tokens,)](
            grad.contiguous(), inverse, grad, d_tokens, channels,
            K=k, KP=triton.next_power_of_2(k), WEIGHTED=False, BLOCK=BLOCK_C,
        )  # fmt: skip
        return d_tokens, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor):
        rows, weights = rows.contiguous(), weights.contiguous()
        num_tokens, k = weights.shape
        inverse = _inverse(order)
        out = rows.new_empty((num_tokens, rows.shape[-1]))
        _weighted_sum[(num_tokens,)](
            rows, inverse, weights, out, rows.shape[-1],
            K=k, KP=triton.next_power_of_2(k), WEIGHTED=True, BLOCK=BLOCK_C,
        )  # fmt: skip
        ctx.save_for_backward(rows, inverse, weights)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, inverse, weights = ctx.saved_tensors
        num_tokens, k = weights.shape
        d_rows, d_weights = torch.empty_like(rows), torch.empty_like(weights)
        _unpermute_backward[(num_tokens,)](
            rows, inverse, weights, grad.contiguous(), d_rows, d_weights, rows.shape[-1],
            K=k, KP=triton.next_power_of_2(k), BLOCK=BLOCK_C,
        )  # fmt: skip
        return d_rows, None, d_weights


@register("moe_permute", "triton")
def moe_permute(
    tokens: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (N, C), expert_ids (N, k) -> permuted (N k, C) grouped by expert, order (N k,)
    (the flat slot each row came from), tokens per expert (E,)."""
    flat_ids = expert_ids.flatten()
    order = flat_ids.argsort(stable=True)
    counts = tokens_per_expert(flat_ids, num_experts)
    return _Permute.apply(tokens, order, expert_ids.shape[1]), order, counts


@register("moe_unpermute", "triton")
def moe_unpermute(
    expert_out: torch.Tensor, order: torch.Tensor, gate_weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Each token's k expert outputs weighted by its gate weights and summed, back in token
    order: (N k, C), (N k,), (N, k) -> (N, C) in the expert outputs' dtype."""
    if gate_weights.shape[0] != num_tokens:
        raise ValueError(f"gate_weights has {gate_weights.shape[0]} rows for {num_tokens} tokens")
    return _Unpermute.apply(expert_out, order, gate_weights)
