"""V4's interleaved RoPE on the trailing channels of each row, as plain torch: the `reference`
backend's `rope_trailing` (kernels/reference.py) and what the other backends are tested
against."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _wide(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x with adjacent channel pairs of its last 2 * cos.shape[-1] channels turned by the
    angles whose cosines and sines are given (in float32 at least, written back in x's
    dtype)."""
    width = 2 * cos.shape[-1]
    pairs = x[..., -width:].to(_wide(x)).unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = x.clone(memory_format=torch.contiguous_format)  # as the concatenation was
    turned = out[..., -width:].unflatten(-1, (-1, 2))
    turned[..., 0] = even * cos - odd * sin
    turned[..., 1] = even * sin + odd * cos
    return out


def _rotated_as_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`_rotated` with each channel pair as one complex number times cos + i sin: one
    vectorised product, where the pairs' strided products and sums were six small kernels
    (0.4 against 0.2 ms for `tiny`'s queries on a CPU; the same values). Eager on a CPU only,
    where it was measured: inductor traces `_rotated`'s real arithmetic, and accelerators run
    `_rotated` as before."""
    width = 2 * cos.shape[-1]
    pairs = x[..., -width:].to(_wide(x)).unflatten(-1, (-1, 2)).contiguous()
    if pairs.storage_offset() % 2:  # a view at an odd offset: complex needs pairs aligned
        pairs = pairs.clone()
    turned = torch.view_as_complex(pairs) * torch.complex(cos.to(_wide(cos)), sin.to(_wide(sin)))
    out = x.clone(memory_format=torch.contiguous_format)
    out[..., -width:] = torch.view_as_real(turned).flatten(-2)
    return out


def _turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (_rotated_as_complex if x.device.type == "cpu" else _rotated)(x, cos, sin)


class _Rotation(torch.autograd.Function):
    """A rotation's gradient is the gradient turned back (the angles negated): backward is
    the forward again, keeping only the tables. Autograd through the expression kept the
    rotated channels' float32 copy and ran a slice, a stack and a concatenation backward, each
    a zero-filled copy of x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _turn(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _turn(grad, cos, -sin), None, None


def rotate_trailing(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """V4's interleaved RoPE: rotates adjacent channel pairs of the last 2 * cos.shape[-1]
    channels of x (cos/sin broadcast over x's other dims); the leading channels pass.
    Compiled code, and tables that carry a gradient (none of this model's do), let autograd
    differentiate the rotation as written."""
    if torch.compiler.is_compiling() or cos.requires_grad or sin.requires_grad:
        return _rotated(x, cos, sin)  # differentiated as written
    return _Rotation.apply(x, cos, sin)


def table_rows(x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For a fused rotation: the table (cos or sin, broadcast against x's channel pairs) as
    float32 (rows, pairs), contiguous, with the number of x's consecutive rows each of its rows
    serves. Its leading dims are x's first ones, then ones (a token's angles for all its
    heads); any other broadcast is expanded to one table row per row of x."""
    lead = x.shape[:-1]
    dims = (1,) * (len(lead) - table.dim() + 1) + tuple(table.shape[:-1])
    kept = len(lead)
    while kept and dims[kept - 1] == 1:
        kept -= 1
    if tuple(dims[:kept]) != tuple(lead[:kept]):
        table, kept = table.expand(*lead, table.shape[-1]), len(lead)
    rows = table.reshape(-1, table.shape[-1]).float().contiguous()
    served = x.numel() // (x.shape[-1] * rows.shape[0]) if rows.numel() else 1
    return rows, served


def fused_tables(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What a backend's fused rotation takes: cos and sin as `table_rows` gives them, with the
    rows of x each serves. Tables that carry a gradient are refused: the fused kernels turn x
    only (none of the model's tables does; the reference differentiates them)."""
    # plain checks, not torch._check: dynamo cannot trace its message closures (a graph break)
    if cos.requires_grad or sin.requires_grad:
        raise RuntimeError(
            f"the {backend} backend's rope_trailing gives no gradient to cos/sin; "
            "backend.kernels=reference differentiates them"
        )
    if cos.shape != sin.shape:
        raise RuntimeError(f"cos {cos.shape} and sin {sin.shape} differ")
    cos_rows, groups = table_rows(x, cos)
    return cos_rows, table_rows(x, sin)[0], groups
