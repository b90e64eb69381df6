"""The CSA indexer's loss (`indexer_loss`, kernels/indexer_loss.py) on the `npu` backend as
torch_npu's `npu_sparse_lightning_indexer_grad_kl_loss`: DeepSeek-V3.2's indexer training on
Ascend, one operator that recomputes the main attention's probabilities at each query's
picks from its queries, keys and softmax statistics, sums them over the heads and
L1-normalises them (the target), scores the picks with the indexer (I = W @ ReLU(q_I k_I^T)),
and returns sum over queries of KL(target || softmax(I)) with the gradients of the indexer's
queries, keys and weights (its docs and its README in ops-transformer give these formulas).

The reference keeps for backward the indexer's per-head scores at every entry or, where
that keeps less (V4-Flash past about 4K tokens), at the picks with the picked keys gathered
in float32 (about 0.5 MiB a token in every CSA layer at 64K tokens), and gathers the picked
entries once more, a block of queries at a time, for the target. Here only the three
gradients the forward computed are kept (the loss is the operator's by-product, so backward
is a product): 16 KiB a token at V4-Flash's shape. The price: the forward does the backward's
work even where no gradient is taken (an evaluation's loss), and again when activation
checkpointing recomputes the layer.

How our tensors meet its arguments:
- softmax_max = the attention's normaliser lse (window, picks and sink all in it) and
  softmax_sum = 1, so its e^(s - max) / sum is exactly our probability of each pick.
- weights carry the 1 / sqrt(d_I) our index scores have (ReLU(x) c = ReLU(c x), c > 0).
- its only sparse mode is 3 (right-down causal: key s <= query t + S2 - S1), so the keys are
  laid out with S2 = T rows: a zero row 0, entry e at row e + 1 (its block ended at or before
  any query that sees it: e + 1 <= t), zeros after the entries.
- a query's list holds its visible picks (row e + 1) first, -1 after (the docs' rule); a query
  with none lists the zero row alone with softmax_max 0: one pick of target 1 and softmax 1,
  so its loss and gradients are exactly 0 (all -1 is a case the docs leave open). Our loss is
  the mean over queries that picked anything, so the operator's sum is divided by their count.

Limits (the reference runs otherwise; the table says so): the operator's README lists main
heads of 8 to 128 and indexer heads of 8 to 64 (powers of two), one KV head, heads of 512
channels (query_rope optional) and 128 for the indexer (its typical value), bf16 or fp16,
sequences to 128K; the causal layout needs fewer entries than tokens (a ratio of 2 or more);
tensor parallelism splits the heads, which the operator cannot sum across ranks (the model
composes the reference's parts there).

Where the two differ, unchecked on a 910: a query whose picks' attention probabilities all
underflow float32 (logits 87 below its normaliser: its window and sink take everything) the
reference leaves out of its mean, and the operator's L1 normalisation divides 0 by 0. The
operator's loss is taken to be the sum over queries (the docs give its shape, (1,), and the
formula a sum), I unscaled, p = e^(s - max) / sum and dW the gradient of the weights handed
in: `birkhoff doctor --backend npu` on a 910 checks each against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from birkhoff.kernels import indexer_loss as reference
from birkhoff.kernels.npu_ops import NPU, _torch_npu
from birkhoff.kernels.npu_v4_attention import valid_first
from birkhoff.kernels.registry import register

INDEXER_DTYPES = (torch.bfloat16, torch.float16)
QUERY_HEADS = (8, 16, 32, 64, 128)
INDEX_HEADS = (8, 16, 32, 64)
QUERY_DIM, INDEX_DIM = 512, 128
MAX_TOKENS = 128 * 1024
LIMITS = (
    "8 to 128 heads of 512 channels and 8 to 64 indexer heads of 128 (powers of two), up to "
    "131,072 tokens, more tokens than entries"
)


def indexer_operator_takes(
    heads: int, index_heads: int, dim: int, index_dim: int, dtype: torch.dtype, seq: int
) -> bool:
    """Whether the indexer's loss at these shapes goes to the operator (the planner asks it
    too)."""
    return (
        dtype in INDEXER_DTYPES
        and heads in QUERY_HEADS
        and index_heads in INDEX_HEADS
        and (dim, index_dim) == (QUERY_DIM, INDEX_DIM)
        and 0 < seq <= MAX_TOKENS
    )


@register("indexer_loss", NPU, dtypes=INDEXER_DTYPES, limits=LIMITS)
def indexer_loss(
    q: torch.Tensor,
    values: torch.Tensor,
    lse: torch.Tensor,
    index_q: torch.Tensor,
    index_keys: torch.Tensor,
    index_weights: torch.Tensor,
    picks: torch.Tensor,
    picked: torch.Tensor,
) -> torch.Tensor:
    """The reference's op (same arguments, the same scalar) as one operator call."""
    batch, seq, heads, dim = q.shape
    index_heads, index_dim = index_q.shape[2:]
    args = (q, values, lse, index_q, index_keys, index_weights, picks, picked)
    takes = indexer_operator_takes(heads, index_heads, dim, index_dim, q.dtype, seq)
    # its causal layout needs E < T; with no entries nothing is picked
    if batch == 0 or not takes or not 0 < values.shape[1] < seq:
        return reference.indexer_loss(*args)
    listed, has_picks = pick_rows(picks, picked)
    keys = _key_rows(values.detach().to(q.dtype), seq)
    softmax_max = lse.detach().float().masked_fill(~has_picks[..., None], 0.0)
    return _IndexerKL.apply(
        index_q, index_keys, index_weights, q.detach(), keys, listed, softmax_max, has_picks
    )


def pick_rows(picks: torch.Tensor, picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, 1, k) int32 key rows of each query's visible picks (entry e at row e + 1) first,
    -1 after, the zero row 0 alone for a query with none; and which queries have any."""
    has_picks = picked.any(-1)
    listed = valid_first((picks + 1).to(torch.int32), picked)
    listed[..., 0] = torch.where(has_picks, listed[..., 0], 0)
    return listed[:, :, None], has_picks


def _key_rows(entries: torch.Tensor, seq: int) -> torch.Tensor:
    """(B, E, D) -> (B, T, 1, D): a zero row, the entries, zeros to T rows."""
    return F.pad(entries, (0, 0, 1, seq - entries.shape[1] - 1))[:, :, None].contiguous()


class _IndexerKL(torch.autograd.Function):
    """Forward: the operator's loss summed over the queries, divided by the count of those
    that picked anything; its gradients (of that sum) kept as it gives them. Backward: those
    gradients times the loss's gradient over the count, in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, index_q, index_keys, index_weights, q, keys, listed, softmax_max, has_picks):
        dtype, seq = q.dtype, q.shape[1]
        entries, index_dim = index_keys.shape[1], index_q.shape[-1]
        scale = index_dim**-0.5
        d_index_q, d_index_keys, d_weights, loss = (
            _torch_npu().npu_sparse_lightning_indexer_grad_kl_loss(
                q,  # (B, T, H, D)
                keys,  # (B, T, 1, D)
                index_q.detach().to(dtype).contiguous(),  # (B, T, H_I, D_I)
                _key_rows(index_keys.detach().to(dtype), seq),  # (B, T, 1, D_I)
                (index_weights.detach() * scale).to(dtype).contiguous(),  # (B, T, H_I)
                listed,  # (B, T, 1, k) int32
                softmax_max[:, None].contiguous(),  # (B, 1, T, H): N2 = 1, G = H
                torch.ones_like(softmax_max)[:, None],
                q.shape[-1] ** -0.5,
                layout="BSND",
                sparse_mode=3,
            )
        )
        ctx.scale, ctx.dtypes = scale, (index_q.dtype, index_keys.dtype, index_weights.dtype)
        count = has_picks.sum().clamp_min(1).float()
        # the operator's gradients as it gave them (bf16: half what float32 copies would keep)
        d_index_keys = d_index_keys[:, 1 : entries + 1, 0].contiguous()  # the entries' rows
        ctx.save_for_backward(d_index_q, d_index_keys, d_weights, count)
        return loss.reshape(()) / count

    @staticmethod
    def backward(ctx, grad_loss):
        d_index_q, d_index_keys, d_weights, count = ctx.saved_tensors
        factor = grad_loss.float() / count
        factors = (factor, factor, factor * ctx.scale)  # the weights were handed scaled
        saved = zip((d_index_q, d_index_keys, d_weights), factors, ctx.dtypes, strict=True)
        grads = ((d.float() * f).to(dtype) for d, f, dtype in saved)
        return (*grads, None, None, None, None, None)
