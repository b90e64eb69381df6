"""The CSA lightning indexer's loss as a kernel op (`indexer_loss`): the indexer's scores at
each query's picks, the main attention's probability of each pick summed over heads (its
target, `entry_mass`) and the KL divergence between the two, with its gradient to the
indexer's queries, keys and head weights.

    I[t, s] = sum_h w[t, h] ReLU(q_I[t, h] . k_I[s]) / sqrt(d_I)      (the index score)
    p[t, s] = sum_h exp(q[t, h] . v[s] / sqrt(D) - lse[t, h])          (the target's mass)
    loss = mean over queries t that picked anything of KL(p_t / |p_t| || softmax(I_t))
           over t's visible picks s (DeepSeek-V3.2 §2.1, V4 §2.3.1).

`reference` (here): the scores at the picks either as every entry's, read at the picks, or
from the picked keys gathered (whichever keeps less: the attention's rule `picks_as_mask`
at the indexer's heads and width, so the two may take different forms), the reference
`entry_mass`, then `indexer_kl`. A backend with its own `entry_mass` registers this op
composed with it (`indexer_loss_with`: triton_entry_mass.py); the npu backend runs it as
one torch_npu operator (kernels/npu_indexer_loss.py). The attention's tensors (q, v, lse) are
detached: the indexer learns from the attention, never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from birkhoff.kernels import v4_attention as attention
from birkhoff.kernels.registry import REFERENCE, register
from birkhoff.kernels.v4_attention import picks_as_mask

HeadSum = Callable[[torch.Tensor], torch.Tensor]


def index_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_h w[t, h] ReLU(q[t, h] . k) / sqrt(D) for queries (B, Q, H, D) against keys shared
    by all queries (B, K, D) or each query's own (B, Q, K, D): (B, Q, K)."""
    pattern = "bqhd,bkd->bqhk" if keys.dim() == 3 else "bqhd,bqkd->bqhk"
    per_head = F.relu(torch.einsum(pattern, q, keys))
    return torch.einsum("bqh,bqhk->bqk", weights, per_head * q.shape[-1] ** -0.5)


def indexer_kl(
    attention_mass: torch.Tensor, index: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean over queries of KL(p || softmax(index)) on each query's selected entries, where p
    is the main attention's probability of each entry summed over heads, renormalised
    (detached: the indexer learns from the attention, not the reverse). Queries that selected
    nothing visible do not count."""
    target = attention_mass.detach().masked_fill(~valid, 0.0)
    total = target.sum(-1, keepdim=True)
    counted = (total.squeeze(-1) > 0) & valid.any(-1)
    target = target / total.clamp_min(torch.finfo(target.dtype).tiny)
    # A row with nothing selected would be all -inf: NaN in log_softmax and its gradient.
    logits = torch.where(counted[..., None], index.masked_fill(~valid, -torch.inf), 0.0)
    log_q = torch.log_softmax(logits, dim=-1)
    terms = torch.where(target > 0, target * (target.log() - log_q), torch.zeros_like(target))
    per_query = terms.sum(-1)
    return (per_query * counted).sum() / counted.sum().clamp_min(1)


def _unchanged(part: torch.Tensor) -> torch.Tensor:
    return part


def scores_at_picks(
    index_q: torch.Tensor,
    index_keys: torch.Tensor,
    index_weights: torch.Tensor,
    picks: torch.Tensor,
    head_sum: HeadSum = _unchanged,
) -> torch.Tensor:
    """The index scores (B, T, k) at each query's picks, differentiable: every entry's read at
    the picks or the picked keys gathered, whichever keeps less for backward (the attention's
    rule, `picks_as_mask`, at the indexer's heads and width); `head_sum` adds the other
    tensor-parallel ranks' heads."""
    heads, dim = index_q.shape[2], index_q.shape[3]
    if picks_as_mask(heads, index_keys.shape[1], picks.shape[-1], dim):
        # gathered before the sum: every rank has the same picks, so T x k crosses ranks, not T x E
        return head_sum(index_scores(index_q, index_keys, index_weights).gather(-1, picks))
    rows = torch.arange(picks.shape[0], device=picks.device)[:, None, None]
    return head_sum(index_scores(index_q, index_keys[rows, picks], index_weights))


def composed_indexer_loss(
    mass: Callable[..., torch.Tensor],
    q: torch.Tensor,
    values: torch.Tensor,
    lse: torch.Tensor,
    index_q: torch.Tensor,
    index_keys: torch.Tensor,
    index_weights: torch.Tensor,
    picks: torch.Tensor,
    picked: torch.Tensor,
    head_sum: HeadSum = _unchanged,
) -> torch.Tensor:
    """`indexer_loss` from its parts: the scores at the picks, `mass` (a backend's
    `entry_mass`) and `indexer_kl`; `head_sum` sums a tensor-parallel rank's heads with the
    others' (scores and mass alike) before the KL."""
    index = scores_at_picks(index_q, index_keys, index_weights, picks, head_sum)
    target = head_sum(mass(q.detach(), values.detach(), picks, picked, lse.detach()))
    return indexer_kl(target, index.masked_fill(~picked, -torch.inf), picked)


def indexer_loss_with(mass: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The op `indexer_loss` with its target from `mass` (a backend's `entry_mass`)."""

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
        """The indexer's loss, a scalar: the attention's queries (B, T, H, D), entries (B, E,
        D) and normaliser (B, T, H) float32; the indexer's queries (B, T, H_I, D_I), keys (B,
        E, D_I) and head weights (B, T, H_I); picks (B, T, k) indices of entries, picked (B,
        T, k) bool (the pick is visible). Differentiable in the indexer's three tensors only."""
        args = (q, values, lse, index_q, index_keys, index_weights, picks, picked)
        return composed_indexer_loss(mass, *args)

    return indexer_loss


indexer_loss = register("indexer_loss", REFERENCE)(indexer_loss_with(attention.entry_mass))
