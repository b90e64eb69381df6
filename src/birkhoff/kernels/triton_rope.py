"""V4's interleaved RoPE on the trailing channels (`rope_trailing`) as one Triton kernel per
direction (the `triton` backend): a program per 16 rows copies their leading channels and
turns their trailing pairs by each token's angles, in float32, stored in x's dtype; the
gradient is the same kernel turning back. The reference's rotation (kernels/rotation.py)
launches a copy of the pairs, their products and sums, a clone of the row and a write back,
each direction. With `norm_eps` (V4's per-head query norm) the same launch normalises each
row first, y = turn(x r) with r = (mean(x^2) + eps)^(-1/2) (x r rounded to x's dtype before
the turn, as the reference's norm returns it), and keeps r; the backward turns the gradient
back, u, and writes dx = r u - x r^3 <u, x> / width in one more launch, where the reference's
norm ran a dozen kernels. The tests compare with the rotation written as complex
multiplication under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from birkhoff.kernels import reference
from birkhoff.kernels.registry import register
from birkhoff.kernels.rotation import fused_tables

BLOCK_LEAD = 128
# Rows a program turns: a row's pairs are few (V4: 32), too little work for a program of
# its own; and Triton's interpreter (the tests on a CPU) runs each program in Python.
ROWS = 16


@triton.jit
def _rows(row, s0, s1, s2, n1, n2):
    """Offsets of rows `row` of x viewed as (n0, n1, n2) leading dims with strides s0..s2."""
    return (row // (n1 * n2)) * s0 + ((row // n2) % n1) * s1 + (row % n2) * s2


@triton.jit
def _row_block(cos_ptr, sin_ptr, s0, s1, s2, n1, n2, width, pairs, groups, sign, total_rows,
               ROWS: tl.constexpr, PAIRS: tl.constexpr):  # fmt: skip
    """This program's ROWS rows: (row, live, their offsets in the strided x, the leading
    channels' count, pair index, live pairs, cos and sign * sin of their tokens' angles)."""
    # 64-bit offsets: rows x width passes 2^31
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = row < total_rows
    i = tl.arange(0, PAIRS)
    on = live[:, None] & (i < pairs)[None, :]
    table = (row // groups)[:, None] * pairs + i[None, :]
    c = tl.load(cos_ptr + table, mask=on, other=0.0)
    s = sign * tl.load(sin_ptr + table, mask=on, other=0.0)
    return row, live, _rows(row, s0, s1, s2, n1, n2), width - 2 * pairs, i, on, c, s


@triton.jit
def _turn(
    x_ptr, cos_ptr, sin_ptr, out_ptr, scale_ptr, s0, s1, s2, n1, n2, cs, width, pairs, groups,
    sign, eps, total_rows, NORM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    PAIRS: tl.constexpr,
):  # fmt: skip
    """ROWS rows of x, read through their strides (leading dims (n0, n1, n2): s0, s1, s2;
    channels: cs), into the contiguous out; with NORM each row times its r first, r stored."""
    row, live, base, lead, i, on, c, s = _row_block(
        cos_ptr, sin_ptr, s0, s1, s2, n1, n2, width, pairs, groups, sign, total_rows, ROWS, PAIRS
    )
    kind = out_ptr.dtype.element_ty
    even_at = base[:, None] + (lead + 2 * i[None, :]) * cs
    even = tl.load(x_ptr + even_at, mask=on, other=0.0).to(tl.float32)
    odd = tl.load(x_ptr + even_at + cs, mask=on, other=0.0).to(tl.float32)
    r = tl.full((ROWS,), 1.0, tl.float32)
    if NORM:
        squares = tl.sum(even * even + odd * odd, axis=1)
        for start in range(0, lead, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = live[:, None] & (cols < lead)[None, :]
            kept = tl.load(x_ptr + base[:, None] + cols[None, :] * cs, mask=inside, other=0.0)
            kept = kept.to(tl.float32)
            squares += tl.sum(kept * kept, axis=1)
        r = 1.0 / tl.sqrt(squares / width + eps)
        tl.store(scale_ptr + row, r, mask=live)
        even = (even * r[:, None]).to(kind).to(tl.float32)
        odd = (odd * r[:, None]).to(kind).to(tl.float32)
    for start in range(0, lead, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = live[:, None] & (cols < lead)[None, :]
        kept = tl.load(x_ptr + base[:, None] + cols[None, :] * cs, mask=inside)
        if NORM:
            kept = kept.to(tl.float32) * r[:, None]
        tl.store(out_ptr + row[:, None] * width + cols[None, :], kept.to(kind), mask=inside)
    at = row[:, None] * width + lead + 2 * i[None, :]
    tl.store(out_ptr + at, (even * c - odd * s).to(kind), mask=on)
    tl.store(out_ptr + at + 1, (even * s + odd * c).to(kind), mask=on)


@triton.jit
def _normed_backward(
    g_ptr, x_ptr, scale_ptr, cos_ptr, sin_ptr, dx_ptr, s0, s1, s2, n1, n2, cs, width, pairs,
    groups, sign, total_rows, ROWS: tl.constexpr, BLOCK: tl.constexpr, PAIRS: tl.constexpr,
):  # fmt: skip
    """dx of ROWS rows of the normed turn: g (strided as in _turn) turned back by -sign to u
    (rounded to x's dtype, as the reference's turn hands it to its norm), then
    dx = r u - x r^3 <u, x> / width; x and dx contiguous."""
    row, live, base, lead, i, on, c, s = _row_block(
        cos_ptr, sin_ptr, s0, s1, s2, n1, n2, width, pairs, groups, -sign, total_rows, ROWS, PAIRS
    )
    kind = dx_ptr.dtype.element_ty
    g_at = base[:, None] + (lead + 2 * i[None, :]) * cs
    g_even = tl.load(g_ptr + g_at, mask=on, other=0.0).to(tl.float32)
    g_odd = tl.load(g_ptr + g_at + cs, mask=on, other=0.0).to(tl.float32)
    u_even = (g_even * c - g_odd * s).to(kind).to(tl.float32)
    u_odd = (g_even * s + g_odd * c).to(kind).to(tl.float32)
    at = row[:, None] * width + lead + 2 * i[None, :]
    x_even = tl.load(x_ptr + at, mask=on, other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + at + 1, mask=on, other=0.0).to(tl.float32)
    dot = tl.sum(u_even * x_even + u_odd * x_odd, axis=1)
    for start in range(0, lead, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = live[:, None] & (cols < lead)[None, :]
        u = tl.load(g_ptr + base[:, None] + cols[None, :] * cs, mask=inside, other=0.0)
        x = tl.load(x_ptr + row[:, None] * width + cols[None, :], mask=inside, other=0.0)
        dot += tl.sum(u.to(tl.float32) * x.to(tl.float32), axis=1)
    r = tl.load(scale_ptr + row, mask=live, other=0.0)
    k = (r * r * r * dot / width)[:, None]
    r = r[:, None]
    for start in range(0, lead, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = live[:, None] & (cols < lead)[None, :]
        u = tl.load(g_ptr + base[:, None] + cols[None, :] * cs, mask=inside, other=0.0)
        at_lead = row[:, None] * width + cols[None, :]
        x = tl.load(x_ptr + at_lead, mask=inside, other=0.0).to(tl.float32)
        tl.store(dx_ptr + at_lead, (r * u.to(tl.float32) - x * k).to(kind), mask=inside)
    tl.store(dx_ptr + at, (r * u_even - x_even * k).to(kind), mask=on)
    tl.store(dx_ptr + at + 1, (r * u_odd - x_odd * k).to(kind), mask=on)


def _strided(x: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple]:
    """x read where it lies (up to three leading dims: a strided gradient is not copied
    first, so a call launches one kernel whatever its layout): (rows, sizes, strides)."""
    rows = x if x.dim() <= 4 else x.contiguous()
    pad = 4 - rows.dim()
    return rows, (1,) * pad + rows.shape[:-1], (0,) * pad + rows.stride()[:-1]


def _launch(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: int, sign: float,
    eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """x turned into a contiguous tensor (normalised first with `eps`: then with r per row)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    width = x.shape[-1]
    total = out.numel() // width if width else 0
    scale = None if eps is None else torch.empty(total, dtype=torch.float32, device=x.device)
    if not total:
        return out, scale
    rows, sizes, strides = _strided(x)
    pairs = cos.shape[-1]
    _turn[(triton.cdiv(total, ROWS),)](
        rows, cos, sin, out, scale, *strides, sizes[1], sizes[2], rows.stride(-1), width, pairs,
        groups, sign, 0.0 if eps is None else eps, total, NORM=eps is not None, ROWS=ROWS,
        BLOCK=BLOCK_LEAD, PAIRS=triton.next_power_of_2(pairs),
    )  # fmt: skip
    return out, scale


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, groups: int, sign: float) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.groups, ctx.sign = groups, sign
        return _launch(x, cos, sin, groups, sign)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors  # a turn's gradient is the gradient turned back
        return _launch(grad, cos, sin, ctx.groups, -ctx.sign)[0], None, None, None, None


class _NormedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, groups: int, sign: float, eps: float) -> torch.Tensor:
        out, scale = _launch(x, cos, sin, groups, sign, eps)
        ctx.save_for_backward(x, cos, sin, scale)
        ctx.groups, ctx.sign = groups, sign
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, cos, sin, scale = ctx.saved_tensors
        x = x.contiguous()
        d_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        total = scale.numel()
        if total:
            rows, sizes, strides = _strided(grad)
            pairs = cos.shape[-1]
            _normed_backward[(triton.cdiv(total, ROWS),)](
                rows, x, scale, cos, sin, d_x, *strides, sizes[1], sizes[2], rows.stride(-1),
                x.shape[-1], pairs, ctx.groups, ctx.sign, total, ROWS=ROWS, BLOCK=BLOCK_LEAD,
                PAIRS=triton.next_power_of_2(pairs),
            )  # fmt: skip
        return d_x, None, None, None, None, None


@register("rope_trailing", "triton")
def rope_trailing(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool = False,
    norm_eps: float | None = None,
) -> torch.Tensor:
    """The reference's `rope_trailing` in one launch each way: turned in float32, returned in
    x's dtype; with `norm_eps` each row normalised first in the same launch. Tables that carry
    a gradient are refused (this kernel turns x only)."""
    if torch.compiler.is_compiling():  # inductor fuses the reference's expression
        return reference.rope_trailing(x, cos, sin, inverse, norm_eps)
    cos_rows, sin_rows, groups = fused_tables(x, cos, sin, "triton")
    sign = -1.0 if inverse else 1.0
    if norm_eps is not None:
        return _NormedRope.apply(x, cos_rows, sin_rows, groups, sign, norm_eps)
    return _Rope.apply(x, cos_rows, sin_rows, groups, sign)
