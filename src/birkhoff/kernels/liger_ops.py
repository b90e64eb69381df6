"""The `triton` backend's ops taken from liger-kernel (a maintained library, not written
again here): the fused linear + cross-entropy, which computes each chunk's logits, loss and
gradients with its Triton kernel.

liger-kernel is imported on the first call (importing it costs ~4 s), and only registered
where it is installed (`birkhoff[cuda]`); without it the op is a listed reference fallback.
Its RMSNorm and SwiGLU kernels are not taken: Triton's CPU interpreter cannot run them (it
passes float arguments as Python floats, which they cast with `.to`), so no test here could
check them against the reference.
"""

from __future__ import annotations

import torch

from birkhoff.kernels.registry import register


@register("linear_cross_entropy", "triton")
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy (mean over tokens, float32); it picks its own
    chunk size, so `chunk` is the reference's alone."""
    from liger_kernel.ops.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyFunction,
    )

    loss = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets)[0]
    return loss.float()
