"""The head's matmul and cross-entropy (`linear_cross_entropy`) on the `npu` backend through
torch_npu's fused operators for a vocabulary-parallel head, used here with the whole vocabulary
on the rank (vocabulary slice [0, V)):

- `npu_fused_linear_online_max_sum`: hidden @ weight^T tile by tile, keeping of each row only
  its largest logit, its sum of exp(logit - largest) and the target's logit (return_logits
  False: the operator's memory-saving branch, no logits in memory at all);
- `npu_fused_cross_entropy_loss_with_max_sum`: the rows' losses from those three;
- `npu_fused_linear_cross_entropy_loss_with_max_sum_backward`: the gradients of the hidden
  states and of the weight from the rows' loss gradients, the logits recomputed tile by tile
  from the kept maxima and sums (again without them in memory).

The reference (kernels/linear_cross_entropy.py) keeps each chunk's gradients from its forward
and recomputes nothing; this keeps the hidden states and per row two float32 (largest logit,
sum), its local target and one bit, and multiplies once more in backward (the weight cast again
there rather than its cast copy kept). The backward computes the gradients for a loss gradient
of 1 and keeps them, so a second backward of the same graph (a zero-bubble pipeline schedule's,
inputs then weights) scales them instead of recomputing. The weight's gradient comes back in
the matmul's dtype (the operator's), as autocast's head(x) would give it; the reference sums it
in float32.

Limits (the reference runs otherwise; the table says so): bfloat16 or float16 matmuls, the
operators' only types: the hidden states' dtype, or autocast's where autocast casts them (a
plain residual stream reaches the head in float32; the op casts it, and the weight, as
autocast casts them for head(x)); a vocabulary of at least 128 entries (the backward's weight
rows, its docs). The operators tile by themselves: the reference's `chunk` does not apply.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from birkhoff.kernels.linear_cross_entropy import linear_cross_entropy as reference
from birkhoff.kernels.npu_ops import NPU, _torch_npu
from birkhoff.kernels.registry import matmul_dtype, register

MATMUL_DTYPES = (torch.bfloat16, torch.float16)
LEAST_VOCAB = 128  # the backward operator's weight rows
LIMITS = f"vocabularies of {LEAST_VOCAB} entries or more"


@register("linear_cross_entropy", NPU, dtypes=MATMUL_DTYPES, limits=LIMITS, autocast=True)
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean over tokens of cross_entropy(hidden @ weight.T, targets) in float32: hidden (N, C)
    in bfloat16 or float16 (or float32 under such an autocast: cast to it), weight (V, C)
    (cast to the hidden states' dtype), targets (N,) -> a scalar. `chunk` is the reference's
    (a smaller vocabulary runs it); the operators tile by themselves."""
    if weight.shape[0] < LEAST_VOCAB or hidden.shape[0] == 0:
        return reference(hidden, weight, targets, chunk)
    hidden = hidden.to(matmul_dtype(hidden))  # autocast's cast (its gradient: back to float32)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets)
    loss, *_ = _row_losses(hidden.contiguous(), weight.to(hidden.dtype).contiguous(), targets)
    return loss.mean()


def _row_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple:
    """Each row's loss (float32), and what the backward operator takes back: the rows'
    in-range bit mask and local targets, largest logits and sums of exponentials."""
    vocab = weight.shape[0]
    largest, sums, picked, in_range, local, _ = _torch_npu().npu_fused_linear_online_max_sum(
        hidden, weight, targets, 0, vocab, return_logits=False
    )
    losses, _ = _torch_npu().npu_fused_cross_entropy_loss_with_max_sum(largest, sums, picked)
    return losses, in_range, local, largest, sums


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        hidden = hidden.contiguous()
        matmul_weight = weight.to(hidden.dtype).contiguous()
        losses, in_range, local, largest, sums = _row_losses(hidden, matmul_weight, targets)
        ctx.save_for_backward(hidden, weight, in_range, local, largest, sums)
        ctx.unit_grads = None  # the gradients for a loss gradient of 1, once computed
        return losses.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.unit_grads is None:
            hidden, weight, in_range, local, largest, sums = ctx.saved_tensors
            # the mean's gradient, one float32 per row, as the operator takes it
            rows = hidden.shape[0]
            per_row = torch.full((rows,), 1.0 / rows, dtype=torch.float32, device=hidden.device)
            grads = _torch_npu().npu_fused_linear_cross_entropy_loss_with_max_sum_backward(
                per_row,
                hidden,
                weight.to(hidden.dtype).contiguous(),
                in_range,
                local,
                logits_max=largest,
                sum_exp_logits=sums,
            )
            ctx.unit_grads = (grads[0], grads[1].to(weight.dtype))
        grad_hidden, grad_weight = (g * grad_loss.to(g.dtype) for g in ctx.unit_grads)
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        return grad_hidden if want_hidden else None, grad_weight if want_weight else None, None
