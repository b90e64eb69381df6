"""Rotary position embedding tables (the rotations themselves: kernels/rotation.py, op
`rope_trailing`)."""

from __future__ import annotations

import math

import torch


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


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim // 2), in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()
