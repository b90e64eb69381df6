"""The MoE router after its matmul (`moe_route`): scores from the logits, the top-k experts by
the biased scores (aux-loss-free balancing's bias, DeepSeek-V3), and the gate weights: the
chosen experts' unbiased scores normalised over the k and scaled. The reference op, in plain
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


@register("moe_route", REFERENCE)
def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    score_func: str,
    route_scale: float,
    expert_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, E), bias (E,) -> gate weights (N, k), expert ids (N, k) (the k largest
    scores + bias, largest first, unless `expert_ids` are given: a hash layer's, or the ones
    Anticipatory Routing planned), scores (N, E). The bias steers the choice only; the weights
    and scores carry the gradient."""
    scores = expert_scores(logits, score_func)
    if expert_ids is None:
        expert_ids = (scores.detach() + bias).topk(top_k, dim=-1).indices
    chosen = scores.gather(-1, expert_ids)
    return chosen / chosen.sum(-1, keepdim=True) * route_scale, expert_ids, scores
