"""The CSA indexer's target as one Triton kernel (the `triton` backend's `entry_mass`).

For query t of sequence b and its picks e_1..e_k, with lse the attention's normaliser per
head h:
    mass[b, t, j] = sum_h exp(<q[b, t, h], v[b, e_j]> / sqrt(D) - lse[b, t, h])   (0 where
    pick j is not visible).
The reference (kernels/v4_attention.py) gathers each query's picked entries into memory, a
block of queries at a time within its memory budget: at V4-Flash's shape (64 heads, 512
picks of 512 channels, 2 x 4,096 tokens) 683 blocks of 11 ops in every CSA layer, most of a
micro-batch's kernel launches (`birkhoff plan --launches`). Here one launch per layer: a
program per query and block of picks reads the picked entries once per block of heads from
where they lie, accumulates the logits over blocks of channels in float32 (full precision,
no TF32), and sums the probabilities over the heads; nothing is gathered into memory. No
gradient (the target learns nothing back). The tests compare it with the reference under
TRITON_INTERPRET=1. The backend's `indexer_loss` is the reference's with this target.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from birkhoff.kernels.indexer_loss import indexer_loss_with
from birkhoff.kernels.registry import register

BLOCK_K, BLOCK_H, BLOCK_D = 16, 16, 64  # picks, heads, channels per step (tl.dot: >= 16)


@triton.jit
def _entry_mass_kernel(
    q_ptr, v_ptr, picks_ptr, picked_ptr, lse_ptr, out_ptr,
    T, H, D, K, E, scale,
    stride_qb, stride_qt, stride_qh,
    stride_vb, stride_ve,
    stride_pb, stride_pt,
    stride_lb, stride_lt,
    BK: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    # 64-bit offsets: tokens x heads x channels passes 2^31
    token, block = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, t = token // T, token % T
    k = block * BK + tl.arange(0, BK)
    in_k = k < K
    pick_at = b * stride_pb + t * stride_pt + k
    picks = tl.load(picks_ptr + pick_at, mask=in_k, other=0)
    picks = tl.minimum(tl.maximum(picks, 0), E - 1)  # read in bounds; masked below
    seen = tl.load(picked_ptr + pick_at, mask=in_k, other=0) != 0
    rows = v_ptr + b * stride_vb + picks.to(tl.int64) * stride_ve
    mass = tl.zeros((BK,), dtype=tl.float32)
    for h0 in range(0, H, BH):
        h = h0 + tl.arange(0, BH)
        in_h = h < H
        heads = q_ptr + b * stride_qb + t * stride_qt + h * stride_qh
        logits = tl.zeros((BH, BK), dtype=tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            in_d = d < D
            q = tl.load(heads[:, None] + d[None, :], mask=in_h[:, None] & in_d[None, :], other=0)
            v = tl.load(rows[:, None] + d[None, :], mask=in_k[:, None] & in_d[None, :], other=0)
            # in float32 at full precision, as the reference (no TF32 rounding of the logits)
            q, v = q.to(tl.float32), v.to(tl.float32)
            logits += tl.dot(q, tl.trans(v), input_precision="ieee")
        lse = tl.load(lse_ptr + b * stride_lb + t * stride_lt + h, mask=in_h, other=0.0)
        p = tl.exp(logits * scale - lse[:, None])
        mass += tl.sum(tl.where(in_h[:, None], p, 0.0), axis=0)
    tl.store(out_ptr + token * K + k, tl.where(seen, mass, 0.0), mask=in_k)


@register("entry_mass", "triton")
@torch.no_grad()
def entry_mass(
    q: torch.Tensor,
    values: torch.Tensor,
    picks: torch.Tensor,
    picked: torch.Tensor,
    lse: torch.Tensor,
) -> torch.Tensor:
    """Same contract as the reference `entry_mass`."""
    batch, seq, heads, dim = q.shape
    width, count = picks.shape[-1], values.shape[1]
    q = q.contiguous() if q.stride(-1) != 1 else q
    values = values.contiguous() if values.stride(-1) != 1 else values
    picks, picked = picks.contiguous(), picked.contiguous()
    lse = lse.float().contiguous()
    out = torch.empty(batch, seq, width, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    grid = (batch * seq, triton.cdiv(width, BLOCK_K))
    _entry_mass_kernel[grid](
        q, values, picks, picked, lse, out,
        seq, heads, dim, width, count, dim**-0.5,
        q.stride(0), q.stride(1), q.stride(2),
        values.stride(0), values.stride(1),
        picks.stride(0), picks.stride(1),
        lse.stride(0), lse.stride(1),
        BK=BLOCK_K, BH=BLOCK_H, BD=BLOCK_D,
    )  # fmt: skip
    return out


# the reference's indexer_loss with its target from the kernel above
register("indexer_loss", "triton")(indexer_loss_with(entry_mass))
