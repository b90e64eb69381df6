"""The output head's matmul and the next-token cross-entropy as one op, chunked over tokens, so
the (tokens, vocab) logits never exist whole: at V4's 129,280-token vocabulary a 4096-token
micro-batch's float32 logits alone are 2 GiB, and autograd would keep them, their log-softmax
and, in backward, their gradient.

Each chunk's logits are computed, turned into the chunk's loss and, while they are at hand,
into the gradients of the hidden states and of the weight (softmax minus one-hot, over the
token count); the forward keeps only those gradients and the backward returns them times the
loss's gradient, so no matmul is recomputed. The matmuls run in whatever dtype they would
outside the op (autocast casts them as it casts `head(x)`), the softmax in float32, the
weight's gradient summed over chunks in float32 (float64 inputs: float64 throughout).
Outside autograd (evaluation, look-ahead forwards) no gradient is computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from birkhoff.kernels.registry import REFERENCE, register

LOGITS_CHUNK_BYTES = 1 << 28  # float32 logits of one chunk: 256 MiB (519 tokens at V=129280)


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: as many as keep a chunk's float32 logits within LOGITS_CHUNK_BYTES."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def softmax_cross_entropy_rows(
    logits: torch.Tensor, targets: torch.Tensor, count: int, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed cross-entropy of rows of logits (float32 or float64; overwritten) at
    `targets`, and with `want_grad` their gradient (softmax - one-hot) / count, in place of
    the logits. A backend may compute it otherwise (kernels/cpu_cross_entropy.py)."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    # log-sum-exp in place (torch's logsumexp would make a second chunk-sized temporary)
    largest = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(largest).exp_()
    sums = exps.sum(dim=-1, keepdim=True)
    loss = (largest + sums.log()).squeeze(1).sub(picked).sum()
    if not want_grad:
        return loss, None
    grad_logits = exps.div_(sums)  # softmax, then minus one-hot
    grad_logits[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return loss, grad_logits.div_(count)


RowLossAndGrad = Callable[
    [torch.Tensor, torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor | None]
]


def chunked_linear_cross_entropy(row_loss_and_grad: RowLossAndGrad) -> Callable[..., torch.Tensor]:
    """The op, with each chunk's softmax and loss computed by `row_loss_and_grad` (the reference's
    softmax_cross_entropy_rows, or a backend's)."""

    def linear_cross_entropy(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Mean over tokens of cross_entropy(hidden @ weight.T, targets) in float32: hidden
        (N, C), weight (V, C), targets (N,) -> a scalar (float64 for float64 inputs); `chunk`
        tokens at a time (default: chunk_tokens)."""
        chunk = chunk or chunk_tokens(weight.shape[0])
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _ChunkedLinearCrossEntropy.apply(
                hidden, weight, targets, chunk, row_loss_and_grad
            )
        # no autograd (evaluation, look-ahead forwards under no_grad): the loss alone, where
        # the Function would still see its inputs require gradients and compute them
        return _mean_loss(hidden, weight, targets, chunk, None, None, row_loss_and_grad)

    return linear_cross_entropy


linear_cross_entropy = register("linear_cross_entropy", REFERENCE)(
    chunked_linear_cross_entropy(softmax_cross_entropy_rows)
)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, row_loss_and_grad):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=_wide(hidden)) if want_weight else None
        loss = _mean_loss(
            hidden, weight, targets, chunk, grad_hidden, grad_weight, row_loss_and_grad
        )
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled copies, not in place: a pipeline's zero-bubble schedule runs this backward
        # twice (the input gradients, then the weights'), and the kept ones must not change.
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return *scaled, None, None, None


def _wide(hidden: torch.Tensor) -> torch.dtype:
    return torch.promote_types(hidden.dtype, torch.float32)  # float64 stays float64


def _mean_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    row_loss_and_grad: RowLossAndGrad,
) -> torch.Tensor:
    """The mean loss, chunk by chunk; the gradients go into the given buffers (if any)."""
    count, wide = hidden.shape[0], _wide(hidden)
    total = hidden.new_zeros((), dtype=wide)
    for start in range(0, count, chunk):
        rows = slice(start, start + chunk)
        into = None if grad_hidden is None else grad_hidden[rows]
        total += _chunk(
            hidden[rows], weight, targets[rows], count, wide, into, grad_weight, row_loss_and_grad
        )
    return total / count


def _chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    count: int,
    wide: torch.dtype,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    row_loss_and_grad: RowLossAndGrad,
) -> torch.Tensor:
    """One chunk's summed loss; its gradients written into `grad_hidden` (its rows) and
    added to `grad_weight`. Its logits are freed on return, before the next chunk's exist."""
    # in autocast's dtype under autocast, as head(x) would be; linear, not hidden @ weight.T:
    # autocast caches its cast of the weight itself, never one of a view (cast per chunk)
    logits = F.linear(hidden, weight)
    want_grad = grad_hidden is not None or grad_weight is not None
    loss, grad_logits = row_loss_and_grad(logits.to(wide), targets, count, want_grad)
    if grad_logits is None:
        return loss
    grad_logits = grad_logits.to(logits.dtype)
    if grad_hidden is not None:
        grad_hidden.copy_(grad_logits @ weight)
    if grad_weight is not None:
        grad_weight += grad_logits.T @ hidden
    return loss
