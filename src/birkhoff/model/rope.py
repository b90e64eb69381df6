"""Rotary position embedding tables."""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable


def rope_inv_freq(rope_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d) for channel pair i, in float32 (as transformers' DeepseekV4 computes it)."""
    return 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))


def yarn_inv_freq(
    rope_dim: int,
    theta: float,
    factor: float,
    original_seq_len: int,
    beta_fast: float,
    beta_slow: float,
) -> torch.Tensor:
    """YaRN's frequencies (Peng et al. 2023, "by parts"), as DeepSeek's code computes them:
    channel pairs that turn more than `beta_fast` times within `original_seq_len` keep their
    frequency, those turning fewer than `beta_slow` times are slowed by `factor`, and a linear
    ramp over the pair index (its ends rounded outwards) blends between. No attention scale:
    V4 multiplies neither cos/sin nor the softmax by YaRN's mscale. Factor 1: plain RoPE."""
    inv_freq = rope_inv_freq(rope_dim, theta)
    if factor == 1:
        return inv_freq

    def pair_index(turns: float) -> float:  # the channel d whose wavelength fits `turns` times
        return rope_dim * math.log(original_seq_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), rope_dim - 1)
    span = max(high - low, 1e-3)  # low == high: a step instead of a ramp
    slowed = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / span).clamp(0, 1)
    return inv_freq / factor * slowed + inv_freq * (1 - slowed)


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


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim // 2), in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()
