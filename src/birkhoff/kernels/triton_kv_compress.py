"""V4's compressed KV entries (`kv_compress`) as one Triton kernel per direction (the `triton`
backend): a program per entry reads its block's rows (CSA: and its previous block's first
halves) where they lie, takes the softmax of gate + bias over the slots per channel in two
passes (the maximum, then the sums) and writes the weighted sum of kv and the log-normaliser.
Backward, a program per entry writes the gradients of kv and gate at its slots' rows (a row's
blocks are disjoint: no two programs write one element, no atomics) and its slots' gate
gradient into a per-entry buffer that one sum over the entries turns into the bias' gradient,
in a fixed order. The reference gathers every block into (B, E, 2 ratio, dim) copies and runs a
concatenation, a softmax, a product and a sum, each a launch with its backward. The tests
compare with a per-entry float64 loop under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from birkhoff.kernels import v4_attention as reference
from birkhoff.kernels.registry import register
from birkhoff.kernels.v4_attention import fused_entries

BLOCK_C = 64


@triton.jit
def _slot(gate_ptr, bias_ptr, row, bias_row, column, cols, on, width):
    """A slot's logits (gate + bias) at channels `cols`, -inf where not `on`."""
    z = tl.load(gate_ptr + row * width + column + cols, mask=on, other=0.0).to(tl.float32)
    z += tl.load(bias_ptr + bias_row * width + column + cols, mask=on, other=0.0).to(tl.float32)
    return tl.where(on, z, float("-inf"))


@triton.jit
def _forward(
    kv_ptr, gate_ptr, bias_ptr, start_ptr, kind_ptr, out_ptr, lse_ptr,
    seq, entries, width, dim, ratio, lead, BLOCK: tl.constexpr,
):  # fmt: skip
    entry = tl.program_id(0).to(tl.int64)  # 64-bit offsets: entries x dim passes 2^31
    first = (entry // entries) * seq + tl.load(start_ptr + entry)  # the block's first row
    # as a block: Triton's interpreter refuses a mask made of a block and a scalar
    kind = tl.full((BLOCK,), 0, tl.int32) + tl.load(kind_ptr + entry).to(tl.int32)
    previous = (kind == 2) & (kind * 0 + lead > 0)  # read where the blocks overlap (CSA)
    for c0 in range(0, dim, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        on = (cols < dim) & (kind > 0)
        top = tl.full((BLOCK,), float("-inf"), tl.float32)
        for i in range(0, ratio):
            top = tl.maximum(top, _slot(gate_ptr, bias_ptr, first - ratio + i, i, 0, cols,
                                        on & previous, width))  # fmt: skip
            top = tl.maximum(top, _slot(gate_ptr, bias_ptr, first + i, i, lead, cols, on, width))
        top = tl.where(on, top, 0.0)
        total = tl.zeros((BLOCK,), tl.float32)
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in range(0, ratio):
            row = first - ratio + i
            w = tl.exp(_slot(gate_ptr, bias_ptr, row, i, 0, cols, on & previous, width) - top)
            v = tl.load(kv_ptr + row * width + cols, mask=on & previous, other=0.0)
            total += w
            acc += w * v.to(tl.float32)
            row = first + i
            w = tl.exp(_slot(gate_ptr, bias_ptr, row, i, lead, cols, on, width) - top)
            v = tl.load(kv_ptr + row * width + lead + cols, mask=on, other=0.0)
            total += w
            acc += w * v.to(tl.float32)
        total = tl.where(on, total, 1.0)
        keep = cols < dim
        tl.store(out_ptr + entry * dim + cols, (acc / total).to(out_ptr.dtype.element_ty),
                 mask=keep)  # fmt: skip
        tl.store(lse_ptr + entry * dim + cols, tl.where(on, top + tl.log(total), 0.0), mask=keep)


@triton.jit
def _slot_backward(
    kv_ptr, gate_ptr, bias_ptr, d_kv_ptr, d_gate_ptr, d_bias_ptr, row, i, column, cols, on,
    width, d, o, lse, entry, ratio,
):  # fmt: skip
    """One slot's gradients: d_kv = w d, d_z = w d (kv - out), at its row and in the entry's
    rows of the bias buffer."""
    w = tl.exp(_slot(gate_ptr, bias_ptr, row, i, column, cols, on, width) - lse)
    w = tl.where(on, w, 0.0)
    v = tl.load(kv_ptr + row * width + column + cols, mask=on, other=0.0).to(tl.float32)
    dz = w * d * (v - o)
    at = row * width + column + cols
    tl.store(d_kv_ptr + at, (w * d).to(d_kv_ptr.dtype.element_ty), mask=on)
    tl.store(d_gate_ptr + at, dz.to(d_gate_ptr.dtype.element_ty), mask=on)
    tl.store(d_bias_ptr + (entry * ratio + i) * width + column + cols, dz, mask=on)


@triton.jit
def _backward(
    grad_ptr, kv_ptr, gate_ptr, bias_ptr, start_ptr, kind_ptr, out_ptr, lse_ptr,
    d_kv_ptr, d_gate_ptr, d_bias_ptr, seq, entries, width, dim, ratio, lead,
    BLOCK: tl.constexpr,
):  # fmt: skip
    entry = tl.program_id(0).to(tl.int64)
    first = (entry // entries) * seq + tl.load(start_ptr + entry)
    # as a block: Triton's interpreter refuses a mask made of a block and a scalar
    kind = tl.full((BLOCK,), 0, tl.int32) + tl.load(kind_ptr + entry).to(tl.int32)
    previous = (kind == 2) & (kind * 0 + lead > 0)  # read where the blocks overlap (CSA)
    for c0 in range(0, dim, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        on = (cols < dim) & (kind > 0)
        at = entry * dim + cols
        d = tl.load(grad_ptr + at, mask=on, other=0.0).to(tl.float32)
        o = tl.load(out_ptr + at, mask=on, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + at, mask=on, other=0.0)
        pointers = (kv_ptr, gate_ptr, bias_ptr, d_kv_ptr, d_gate_ptr, d_bias_ptr)
        for i in range(0, ratio):
            _slot_backward(*pointers, first - ratio + i, i, 0, cols, on & previous, width,
                           d, o, lse, entry, ratio)  # fmt: skip
            _slot_backward(*pointers, first + i, i, lead, cols, on, width, d, o, lse, entry,
                           ratio)  # fmt: skip


def _sizes(kv: torch.Tensor, start: torch.Tensor, dim: int, ratio: int) -> tuple[int, ...]:
    return kv.shape[1], start.shape[1], kv.shape[2], dim, ratio, kv.shape[2] - dim


class _Compress(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, gate, bias, start, kind, dim: int) -> torch.Tensor:
        kv, gate, bias = kv.contiguous(), gate.contiguous(), bias.contiguous()
        out = kv.new_empty(*start.shape, dim)
        lse = torch.empty(out.shape, dtype=torch.float32, device=kv.device)
        if out.numel():
            _forward[(start.numel(),)](
                kv, gate, bias, start, kind, out, lse, *_sizes(kv, start, dim, bias.shape[0]),
                BLOCK=BLOCK_C,
            )  # fmt: skip
        ctx.save_for_backward(kv, gate, bias, start, kind, out, lse)
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kv, gate, bias, start, kind, out, lse = ctx.saved_tensors
        ratio = bias.shape[0]
        d_kv, d_gate = torch.zeros_like(kv), torch.zeros_like(gate)  # rows no block reads: 0
        # each entry's slots' gate gradient in its rows of bias' shape (every element written
        # by one program or left 0), summed over the entries in a fixed order
        per_entry = torch.zeros(start.numel(), ratio, kv.shape[2], device=kv.device)
        if start.numel():
            _backward[(start.numel(),)](
                grad.contiguous(), kv, gate, bias, start, kind, out, lse, d_kv, d_gate,
                per_entry, *_sizes(kv, start, ctx.dim, ratio), BLOCK=BLOCK_C,
            )  # fmt: skip
        return d_kv, d_gate, per_entry.sum(0).to(bias.dtype), None, None, None


@register("kv_compress", "triton")
def kv_compress(
    kv: torch.Tensor,
    gate: torch.Tensor,
    position_bias: torch.Tensor,
    start: torch.Tensor,
    exists: torch.Tensor,
    has_previous: torch.Tensor,
    overlap: bool,
) -> torch.Tensor:
    """The reference's `kv_compress` in one launch each way (and a sum for the bias'
    gradient): computed in float32, returned in kv's dtype."""
    if torch.compiler.is_compiling():  # inductor fuses the reference's expression
        return reference.kv_compress(kv, gate, position_bias, start, exists, has_previous, overlap)
    layout = fused_entries(kv, start, exists, has_previous, overlap)
    return _Compress.apply(kv, gate, position_bias, *layout)
