"""The MoE router after its matmul (`moe_route`): scores from the logits, the top-k experts by
the biased scores (aux-loss-free balancing's bias, DeepSeek-V3), optionally among the experts
of the best groups only (V3's group-limited routing), and the gate weights: the chosen
experts' unbiased scores normalised over the k and scaled. The reference op, in plain
torch; the triton backend's does it in one kernel each way (kernels/triton_moe_route.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from birkhoff.kernels.registry import REFERENCE, register

SCORE_FUNCS = ("sigmoid", "sqrt_softplus")


def expert_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """sigmoid(logits) (V3) or sqrt(softplus(logits)) (V4)."""
    if score_func == "sigmoid":
        return torch.sigmoid(logits)
    return F.softplus(logits).sqrt()


def best_groups_only(biased: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """Group-limited routing (DeepSeek-V3): the E experts split into `num_groups` groups of
    consecutive ids, a group's score the sum of its two best biased scores (its one if it has
    one expert), and the experts outside the `topk_groups` best groups set to -inf."""
    groups = biased.unflatten(-1, (num_groups, -1))
    group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
    keep = group_scores.topk(topk_groups, dim=-1).indices
    dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter(-1, keep, False)
    return groups.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(-2)


def choose_experts(
    scores: torch.Tensor, bias: torch.Tensor, top_k: int, num_groups: int, topk_groups: int
) -> torch.Tensor:
    """The k experts of largest score + bias (largest first), within the best groups where
    the experts are grouped; no gradient."""
    biased = scores.detach() + bias
    if num_groups > 1:
        biased = best_groups_only(biased, num_groups, topk_groups)
    return biased.topk(top_k, dim=-1).indices


@register("moe_route", REFERENCE)
def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    score_func: str,
    route_scale: float,
    expert_ids: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, E), bias (E,) -> gate weights (N, k), expert ids (N, k) (the k largest
    scores + bias, largest first, from the `topk_groups` best of `num_groups` groups, unless
    `expert_ids` are given: a hash layer's, or the ones Anticipatory Routing planned), scores
    (N, E). The bias steers the choice only; the weights and scores carry the gradient."""
    scores = expert_scores(logits, score_func)
    if expert_ids is None:
        expert_ids = choose_experts(scores, bias, top_k, num_groups, topk_groups)
    chosen = scores.gather(-1, expert_ids)
    return chosen / chosen.sum(-1, keepdim=True) * route_scale, expert_ids, scores
