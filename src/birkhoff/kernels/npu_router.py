"""The MoE router after its matmul (`moe_route`) on the `npu` backend through torch_npu's
`npu_moe_gating_top_k` and its backward operator: sigmoid scores, the top-k experts of scores +
bias (aux-loss-free balancing's), and the chosen experts' scores normalised over the k and
scaled (eps 1e-20 in the normalising sum), the scores themselves handed back (out_flag): the
reference's op (kernels/moe_route.py) in one operator each way. V3's group-limited routing
is the operator's too: group_count groups, the k_group best kept, a group scored by the sum
of its two best experts' scores (group_select_mode 1, as the docs' own example calls it;
taken to be the biased scores, as V3 scores groups: unchecked on a device); where the
operator's limits on groups are not met (more than 2 experts a group; the group's experts
rounded up to 32, times the groups, at most 2,048) the groups are chosen as the reference
chooses them and the experts go in through the hash mode below. Semantics: the equivalent
computation in torch_npu's published docs of npu_moe_gating_top_k (the op-plugin docs; the
wheel's docstring gives none): top-k of sigmoid + bias, the weights the chosen sigmoids over
their sum + eps, times the scale.

Experts chosen elsewhere (a hash layer's table, Anticipatory Routing's plan) go in through the
operator's hash mode: input_ids are the rows' own numbers and tid2eid the chosen experts, so
row i takes tid2eid[i] (the wheel's docs: expert indices looked up from tid2eid by input_ids;
the weights as the same operator's hash-mode golden test in CANN's custom ops computes them,
the looked-up experts' sigmoids normalised: unchecked on a device). The backward operator
differentiates the gate weights; the scores' own gradient (a balance loss's) is added here,
times the sigmoid's derivative s (1 - s).

Limits (the reference runs otherwise; the table says so): sigmoid scores (V3's; the
operator's backward has no other, and V4's sqrt(softplus) is not among its scores), 3 to 2,048
experts, as the operator takes.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from birkhoff.kernels.moe_route import choose_experts
from birkhoff.kernels.moe_route import moe_route as reference
from birkhoff.kernels.npu_ops import NPU, _torch_npu
from birkhoff.kernels.registry import register

SIGMOID = 1  # the operators' norm_type
BEST_TWO = 1  # group_select_mode: a group's score is the sum of its two best biased scores
EPS = 1e-20  # in the normalising sum: the operators' default, written out for both
MOST_EXPERTS = 2048
LIMITS = f"sigmoid scores only, 3 to {MOST_EXPERTS:,} experts"


@register("moe_route", NPU, limits=LIMITS)
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
    """logits (N, E), bias (E,) -> gate weights (N, k), expert ids (N, k) (int64), scores
    (N, E), as the reference's; sigmoid scores only (others run the reference)."""
    experts = logits.shape[-1]
    if score_func != "sigmoid" or not 3 <= experts <= MOST_EXPERTS or logits.shape[0] == 0:
        return reference(*(logits, bias, top_k, score_func, route_scale, expert_ids),
                         num_groups, topk_groups)  # fmt: skip
    groups = (1, 1) if expert_ids is not None else (num_groups, topk_groups)
    if not _operator_groups(experts, groups[0]):
        scores = torch.sigmoid(logits.detach().float())
        expert_ids = choose_experts(scores, bias.float(), top_k, *groups)
        groups = (1, 1)
    return _GatingTopK.apply(logits, bias, top_k, route_scale, expert_ids, *groups)


def _operator_groups(experts: int, num_groups: int) -> bool:
    """Whether the operator takes these groups (its documented limits on group_count)."""
    if num_groups == 1:
        return True
    per = experts // num_groups
    return per > 2 and -(-per // 32) * 32 * num_groups <= MOST_EXPERTS


class _GatingTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, top_k, route_scale, expert_ids, num_groups, topk_groups):
        rows = table = None
        if expert_ids is not None:  # row i takes tid2eid[input_ids[i]] = expert_ids[i]
            rows = torch.arange(logits.shape[0], device=logits.device)
            table = expert_ids.contiguous()
        weights, ids, scores = _torch_npu().npu_moe_gating_top_k(
            logits,
            top_k,
            bias=bias.to(logits.dtype),
            norm_type=SIGMOID,
            out_flag=True,
            routed_scaling_factor=route_scale,
            eps=EPS,
            input_ids=rows,
            tid2eid=table,
            k_group=topk_groups,  # 1, 1 and 0 (the operator's defaults) without groups
            group_count=num_groups,
            group_select_mode=BEST_TWO if num_groups > 1 else 0,
        )
        ctx.save_for_backward(scores, ids)
        ctx.route_scale, ctx.dtype = route_scale, logits.dtype
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        ids = ids.long()
        ctx.mark_non_differentiable(ids)
        return weights, ids, scores.to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights, _grad_ids, grad_scores):
        scores, ids = ctx.saved_tensors
        grad = None
        if grad_weights is not None:
            grad = _torch_npu().npu_moe_gating_top_k_backward(
                scores,
                grad_weights.contiguous(),
                ids,
                norm_type=SIGMOID,
                routed_scaling_factor=ctx.route_scale,
                eps=EPS,
            )
        if grad_scores is not None:  # the scores' own use, through the sigmoid
            through = grad_scores.float() * scores * (1 - scores)
            grad = through if grad is None else grad.float() + through
        return None if grad is None else grad.to(ctx.dtype), None, None, None, None, None, None
