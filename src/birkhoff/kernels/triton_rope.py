"""V4's interleaved RoPE on the trailing channels (`rope_trailing`) as one Triton kernel per
direction (the `triton` backend): a program per 16 rows copies their leading channels and
turns their trailing pairs by each token's angles, in float32, stored in x's dtype; the
gradient is the same kernel turning back. The reference's rotation (kernels/rotation.py)
launches a copy of the pairs, their products and sums, a clone of the row and a write back,
each direction. The tests compare with the rotation written as complex multiplication
under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from birkhoff.kernels import reference
from birkhoff.kernels.registry import register
from birkhoff.kernels.rotation import fused_tables
from birkhoff.kernels.row_functions import rms_normalised

BLOCK_LEAD = 128
# Rows a program turns: a row's pairs are few (V4: 32), too little work for a program of
# its own; and Triton's interpreter (the tests on a CPU) runs each program in Python.
ROWS = 16


@triton.jit
def _turn(
    x_ptr, cos_ptr, sin_ptr, out_ptr, s0, s1, s2, n1, n2, cs, width, pairs, groups, sign,
    total_rows, ROWS: tl.constexpr, BLOCK: tl.constexpr, PAIRS: tl.constexpr,
):  # fmt: skip
    """ROWS rows of x, read through their strides (leading dims (n0, n1, n2): s0, s1, s2;
    channels: cs), into the contiguous out."""
    # 64-bit offsets: rows x width passes 2^31
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = row < total_rows
    base = (row // (n1 * n2)) * s0 + ((row // n2) % n1) * s1 + (row % n2) * s2
    lead = width - 2 * pairs
    for start in range(0, lead, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = live[:, None] & (cols < lead)[None, :]
        kept = tl.load(x_ptr + base[:, None] + cols[None, :] * cs, mask=inside)
        tl.store(out_ptr + row[:, None] * width + cols[None, :], kept, mask=inside)
    i = tl.arange(0, PAIRS)
    on = live[:, None] & (i < pairs)[None, :]
    table = (row // groups)[:, None] * pairs + i[None, :]
    c = tl.load(cos_ptr + table, mask=on, other=0.0)
    s = sign * tl.load(sin_ptr + table, mask=on, other=0.0)
    even_at = base[:, None] + (lead + 2 * i[None, :]) * cs
    even = tl.load(x_ptr + even_at, mask=on, other=0.0).to(tl.float32)
    odd = tl.load(x_ptr + even_at + cs, mask=on, other=0.0).to(tl.float32)
    at = row[:, None] * width + lead + 2 * i[None, :]
    kind = out_ptr.dtype.element_ty
    tl.store(out_ptr + at, (even * c - odd * s).to(kind), mask=on)
    tl.store(out_ptr + at + 1, (even * s + odd * c).to(kind), mask=on)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: int, sign: float):
    """x turned into a contiguous tensor, read where it lies (up to three leading dims: a
    strided gradient is not copied first, so a call launches one kernel whatever its layout)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if not x.numel():
        return out
    rows = x if x.dim() <= 4 else x.contiguous()
    pad = 4 - rows.dim()
    sizes, strides = (1,) * pad + rows.shape[:-1], (0,) * pad + rows.stride()[:-1]
    pairs, width = cos.shape[-1], rows.shape[-1]
    total = out.numel() // width
    _turn[(triton.cdiv(total, ROWS),)](
        rows, cos, sin, out, *strides, sizes[1], sizes[2], rows.stride(-1), width, pairs,
        groups, sign, total, ROWS=ROWS, BLOCK=BLOCK_LEAD, PAIRS=triton.next_power_of_2(pairs),
    )  # fmt: skip
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, groups: int, sign: float) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.groups, ctx.sign = groups, sign
        return _launch(x, cos, sin, groups, sign)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors  # a turn's gradient is the gradient turned back
        return _launch(grad, cos, sin, ctx.groups, -ctx.sign), None, None, None, None


@register("rope_trailing", "triton")
def rope_trailing(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool = False,
    norm_eps: float | None = None,
) -> torch.Tensor:
    """The reference's `rope_trailing` in one launch each way: turned in float32, returned in
    x's dtype; with `norm_eps` the rows are normalised by the reference's RMSNorm first (not
    fused here). Tables that carry a gradient are refused (this kernel turns x only)."""
    if torch.compiler.is_compiling():  # inductor fuses the reference's expression
        return reference.rope_trailing(x, cos, sin, inverse, norm_eps)
    if norm_eps is not None:
        x = rms_normalised(x, norm_eps)
    cos_rows, sin_rows, groups = fused_tables(x, cos, sin, "triton")
    return _Rope.apply(x, cos_rows, sin_rows, groups, -1.0 if inverse else 1.0)
