"""CSA's picked entries attended where they lie: the `triton` backend's V4 attention takes this
for the entries' part when the picks are gathered (`picks_as_mask` false: long sequences),
and merges it with the window's FlexAttention call (kernels/flex_v4_attention.py).

FlexAttention reads keys in blocks of 128: for picks it computes every entry block some query
of a block picked from, which at 64K tokens (16,384 entries, 512 picks a query) is nearly all
of them, about 32x the picks' work. Here a program per query and block of 16 heads reads the
query's own picks (their rows of the entries, from where they lie: nothing gathered into
memory), in blocks of 16, with an online softmax over them: out (B, T, H, D) and its
log-sum-exp over the picks (B, T, H) float32, -inf (and out 0) where a query picked nothing
visible. The logits are float32 (bf16 products are exact in it; float32 inputs at full
precision, no TF32) and the probabilities meet the values in the values' dtype, as the
reference computes them.

Backward, the same programs recompute the logits and the probabilities from the
log-sum-exp (FlashAttention's way: nothing of size picks x channels kept): with
delta = dout . out - d lse per row, ds = p (dout . v - delta), d q = scale ds v, and each
pick's row gets scale ds q + p dout, added atomically into a float32 gradient of the
entries (many queries pick one entry) that is cast back once. The tests compare forward and
backward with a per-query float64 loop under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K, BLOCK_H = 16, 16  # picks and heads per step (tl.dot: >= 16)


@triton.jit
def _pick_rows(v_ptr, picks_ptr, picked_ptr, b, row, k0, K, E, D, stride_vb, stride_ve,
               BK: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """A block of a query's picks: their entry indices, whether each is visible, and their
    rows (0 where not)."""
    k = k0 + tl.arange(0, BK)
    in_k = k < K
    picks = tl.load(picks_ptr + row * K + k, mask=in_k, other=0)
    picks = tl.minimum(tl.maximum(picks, 0), E - 1).to(tl.int64)  # in bounds; masked below
    seen = (tl.load(picked_ptr + row * K + k, mask=in_k, other=0) != 0) & in_k
    d = tl.arange(0, BD)
    at = v_ptr + b * stride_vb + picks[:, None] * stride_ve + d[None, :]
    rows = tl.load(at, mask=seen[:, None] & (d[None, :] < D), other=0.0)
    return picks, seen, rows


@triton.jit
def _program_block(T, H, D, BH: tl.constexpr, BD: tl.constexpr):
    """This program's query (b * T + t), sequence, heads and channels, and the offsets of its
    (BH, BD) block in a contiguous (B, T, H, D) tensor, with their mask."""
    row, hb = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    h = hb * BH + tl.arange(0, BH)
    d = tl.arange(0, BD)
    in_hd = (h[:, None] < H) & (d[None, :] < D)
    return row, row // T, h, d, in_hd, (row * H + h[:, None]) * D + d[None, :]


@triton.jit
def _forward_kernel(
    q_ptr, v_ptr, picks_ptr, picked_ptr, out_ptr, lse_ptr,
    T, H, D, K, E, scale,
    stride_vb, stride_ve,
    BK: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    row, b, h, _channels, in_hd, at = _program_block(T, H, D, BH, BD)
    q = tl.load(q_ptr + at, mask=in_hd, other=0.0)
    largest = tl.full((BH,), float("-inf"), tl.float32)
    total = tl.zeros((BH,), tl.float32)
    acc = tl.zeros((BH, BD), tl.float32)
    for k0 in range(0, K, BK):
        _, seen, rows = _pick_rows(v_ptr, picks_ptr, picked_ptr, b, row, k0, K, E, D,
                                   stride_vb, stride_ve, BK, BD)  # fmt: skip
        s = tl.dot(q, tl.trans(rows), input_precision="ieee") * scale
        s = tl.where(seen[None, :], s, float("-inf"))
        new = tl.maximum(largest, tl.max(s, axis=1))
        shift = tl.where(new == float("-inf"), 0.0, new)  # no visible pick yet: nothing to scale
        p = tl.exp(s - shift[:, None])
        rescale = tl.exp(largest - shift)
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(rows.dtype), rows, input_precision="ieee")
        largest = new
    some = total > 0
    out = acc / tl.where(some, total, 1.0)[:, None]
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=in_hd)
    lse = tl.where(some, largest + tl.log(tl.where(some, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + row * H + h, lse, mask=h < H)


@triton.jit
def _backward_kernel(
    q_ptr, v_ptr, picks_ptr, picked_ptr, lse_ptr, delta_ptr, dout_ptr, dq_ptr, dv_ptr,
    T, H, D, K, E, scale,
    stride_vb, stride_ve,
    BK: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    row, b, h, d, in_hd, at = _program_block(T, H, D, BH, BD)
    q = tl.load(q_ptr + at, mask=in_hd, other=0.0)
    dout = tl.load(dout_ptr + at, mask=in_hd, other=0.0)
    # a head past H or a query with no visible pick: lse +inf here, so every p is 0
    lse = tl.load(lse_ptr + row * H + h, mask=h < H, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(delta_ptr + row * H + h, mask=h < H, other=0.0)
    dq = tl.zeros((BH, BD), tl.float32)
    for k0 in range(0, K, BK):
        picks, seen, rows = _pick_rows(v_ptr, picks_ptr, picked_ptr, b, row, k0, K, E, D,
                                       stride_vb, stride_ve, BK, BD)  # fmt: skip
        s = tl.dot(q, tl.trans(rows), input_precision="ieee") * scale
        p = tl.where(seen[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(dout, tl.trans(rows), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(rows.dtype), rows, input_precision="ieee")
        d_rows = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision="ieee") * scale
        d_rows += tl.dot(tl.trans(p).to(dout.dtype), dout, input_precision="ieee")
        into = dv_ptr + (b * E + picks[:, None]) * D + d[None, :]  # float32 (B, E, D)
        tl.atomic_add(into, d_rows, mask=seen[:, None] & (d[None, :] < D))
    tl.store(dq_ptr + at, (dq * scale).to(dq_ptr.dtype.element_ty), mask=in_hd)


def gathered_entry_attention(
    q: torch.Tensor, values: torch.Tensor, picks: torch.Tensor, picked: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (B, T, H, D) against each one's picked entries: values (B, E, D), picks (B, T,
    k) indices into them, picked (B, T, k) bool. Returns out (B, T, H, D) in the values'
    dtype and the log-sum-exp over the picks (B, T, H) float32, both differentiable (the
    merge with the window's part takes gradients through the log-sum-exp too)."""
    return _Gathered.apply(q.to(values.dtype), values, picks, picked)


def _grid(q: torch.Tensor) -> tuple[int, int]:
    batch, seq, heads, _ = q.shape
    return batch * seq, triton.cdiv(heads, BLOCK_H)


def _sizes(q: torch.Tensor, values: torch.Tensor, picks: torch.Tensor) -> tuple:
    """The kernels' shape arguments and the values' strides."""
    seq, heads, dim = q.shape[1:]
    return (seq, heads, dim, picks.shape[-1], values.shape[1], dim**-0.5,
            values.stride(0), values.stride(1))  # fmt: skip


class _Gathered(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, values, picks, picked):
        q, picks = q.contiguous(), picks.contiguous()
        values = values if values.stride(-1) == 1 else values.contiguous()
        seen = picked.to(torch.uint8).contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        if q.numel():
            block_d = max(16, triton.next_power_of_2(q.shape[-1]))
            _forward_kernel[_grid(q)](
                q, values, picks, seen, out, lse, *_sizes(q, values, picks),
                BK=BLOCK_K, BH=BLOCK_H, BD=block_d,
            )  # fmt: skip
        ctx.save_for_backward(q, values, picks, seen, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, values, picks, seen, out, lse = ctx.saved_tensors
        d_out = d_out.contiguous()
        # dout . out, less the log-sum-exp's own gradient: both enter every pick's ds
        delta = (d_out.float() * out.float()).sum(-1)
        if d_lse is not None:
            delta = delta - d_lse.float()
        dq = torch.empty_like(q)
        dv = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
        if q.numel():
            block_d = max(16, triton.next_power_of_2(q.shape[-1]))
            _backward_kernel[_grid(q)](
                q, values, picks, seen, lse, delta.contiguous(), d_out, dq, dv,
                *_sizes(q, values, picks), BK=BLOCK_K, BH=BLOCK_H, BD=block_d,
            )  # fmt: skip
        return dq, dv.to(values.dtype), None, None
