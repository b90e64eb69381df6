"""Rotary position embedding tables."""

from __future__ import annotations

import torch


def rope_inv_freq(rope_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d) for channel pair i, in float32 (as transformers' DeepseekV4 computes it)."""
    return 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))


def rotate_trailing(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """V4's interleaved RoPE: rotates adjacent channel pairs of the last 2 * cos.shape[-1]
    channels of x (cos/sin broadcast over x's other dims); the leading channels pass."""
    width = 2 * cos.shape[-1]
    rotated = x[..., -width:].float()
    even, odd = rotated[..., 0::2], rotated[..., 1::2]
    pairs = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return torch.cat((x[..., :-width], pairs.flatten(-2).to(x.dtype)), dim=-1)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim // 2), in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()
