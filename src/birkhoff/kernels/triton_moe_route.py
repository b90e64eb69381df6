"""The MoE router after its matmul (`moe_route`, kernels/moe_route.py) as one Triton kernel
per direction (the `triton` backend): a program scores 16 tokens' experts, picks the top k by
the biased scores (k rounds of an argmax, the winner masked out each time: largest first, as
torch's topk returns them; with grouped experts, first the best groups by their two best
biased scores, and the experts of the others masked out), and writes the gate weights. Its
backward recomputes the scores and gives the logits' gradient from the weights' and the
scores' in one pass. The reference launches about eight kernels forward (the score
function, the bias, topk, the gather, the sum, the division, the scale; six more to limit
the groups) and about ten backward.

Scores in float32 as the reference's (the router computes in float32); sqrt(softplus) with
softplus = max(x, 0) + log1p(exp(-|x|)), log1p through log(u) y / (u - 1) with u = 1 + y
(accurate where 1 + y rounds), and x itself above torch's threshold of 20. Ties between
biased scores go to the lower expert id (Triton's argmax), where torch's topk leaves the order
of equal values unspecified. The tests compare with the reference in float64 under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from birkhoff.kernels import moe_route as reference
from birkhoff.kernels.registry import register

ROWS = 16  # tokens a program routes: one token's E scores are little work for a program


@triton.jit
def _scores(x, SQRT_SOFTPLUS: tl.constexpr):
    if SQRT_SOFTPLUS:
        y = tl.exp(-tl.abs(x))
        u = 1.0 + y
        log1p = tl.where(u == 1.0, y, tl.log(u) * y / (u - 1.0))
        softplus = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p)
        return tl.sqrt(softplus)
    return tl.sigmoid(x)


@triton.jit
def _tile(logits_ptr, rows, E, ROWS: tl.constexpr, EP: tl.constexpr, SQRT_SOFTPLUS: tl.constexpr):
    """The program's tokens: their rows, which are live, the expert columns, the tile's mask
    and offsets, the logits (float32) and the scores."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # 64-bit: N x E > 2^31
    live = row < rows
    col = tl.arange(0, EP)
    on = live[:, None] & (col < E)[None, :]
    at = row[:, None] * E + col[None, :]
    x = tl.load(logits_ptr + at, mask=on, other=0.0).to(tl.float32)
    return row, live, col, on, at, x, _scores(x, SQRT_SOFTPLUS)


@triton.jit
def _slot(values, slot, j):
    """Column j of (tokens, KP) `values` (ids or gradients), per token."""
    return tl.sum(tl.where(slot[None, :] == j, values, 0), axis=1)


@triton.jit
def _picked(values, ids, col, slot, j):
    """values[t, ids[t, j]] per token t."""
    return tl.sum(tl.where(col[None, :] == _slot(ids, slot, j)[:, None], values, 0.0), axis=1)


@triton.jit
def _best_groups_only(
    biased, col, per, ROWS: tl.constexpr, GROUPS: tl.constexpr, GP: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
):  # fmt: skip
    """The reference's `best_groups_only`: groups of `per` consecutive experts, each scored by
    its two best biased scores (its one where per = 1), the TOPK_GROUPS best kept (argmax
    rounds: the lower group among equals) and the other groups' experts set to -inf."""
    group = col // per
    slot = tl.arange(0, GP)
    group_scores = tl.full((ROWS, GP), float("-inf"), tl.float32)
    for g in tl.static_range(GROUPS):
        inside = tl.where((group == g)[None, :], biased, float("-inf"))
        best = tl.argmax(inside, axis=1)
        second = tl.max(tl.where(col[None, :] == best[:, None], float("-inf"), inside), axis=1)
        score = tl.max(inside, axis=1) + tl.where(per > 1, second, 0.0)
        group_scores = tl.where(slot[None, :] == g, score[:, None], group_scores)
    keep = tl.zeros(biased.shape, tl.int32)
    for _ in tl.static_range(TOPK_GROUPS):
        best = tl.argmax(group_scores, axis=1)
        keep = tl.where(group[None, :] == best[:, None], 1, keep)
        group_scores = tl.where(slot[None, :] == best[:, None], float("-inf"), group_scores)
    return tl.where(keep > 0, biased, float("-inf"))


@triton.jit
def _forward(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr, scores_ptr, rows, E, scale,
    K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, ROWS: tl.constexpr,
    CHOOSE: tl.constexpr, SQRT_SOFTPLUS: tl.constexpr,
    GROUPS: tl.constexpr, GP: tl.constexpr, TOPK_GROUPS: tl.constexpr,
):  # fmt: skip
    row, live, col, on, at, _, s = _tile(logits_ptr, rows, E, ROWS, EP, SQRT_SOFTPLUS)
    tl.store(scores_ptr + at, s, mask=on)
    slot = tl.arange(0, KP)
    k_on = live[:, None] & (slot < K)[None, :]
    k_at = row[:, None] * K + slot[None, :]
    if CHOOSE:
        bias = tl.load(bias_ptr + col, mask=col < E, other=0.0).to(tl.float32)
        biased = tl.where(on, s + bias[None, :], float("-inf"))
        if GROUPS > 1:
            biased = _best_groups_only(biased, col, E // GROUPS, ROWS, GROUPS, GP, TOPK_GROUPS)
        ids = tl.zeros((ROWS, KP), tl.int32)
        for j in tl.static_range(K):
            best = tl.argmax(biased, axis=1).to(tl.int32)  # the lowest id among equals
            ids = tl.where(slot[None, :] == j, best[:, None], ids)
            biased = tl.where(col[None, :] == best[:, None], float("-inf"), biased)
        tl.store(ids_ptr + k_at, ids.to(tl.int64), mask=k_on)
    else:
        ids = tl.load(ids_ptr + k_at, mask=k_on, other=0).to(tl.int32)
    chosen = tl.zeros((ROWS, KP), tl.float32)
    for j in tl.static_range(K):
        chosen = tl.where(slot[None, :] == j, _picked(s, ids, col, slot, j)[:, None], chosen)
    weights = chosen / tl.sum(chosen, axis=1)[:, None] * scale
    tl.store(weights_ptr + k_at, weights, mask=k_on)


@triton.jit
def _backward(
    logits_ptr, ids_ptr, weights_ptr, d_weights_ptr, d_scores_ptr, d_logits_ptr, rows, E, scale,
    K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, ROWS: tl.constexpr,
    SQRT_SOFTPLUS: tl.constexpr, HAS_D_SCORES: tl.constexpr,
):  # fmt: skip
    """With w_j = scale c_j / S (c the chosen scores, S their sum): dc_j = (scale dw_j -
    sum_l dw_l w_l) / S, added to the scores' own gradient at expert ids[j]; then through the
    score function."""
    row, live, col, on, at, x, s = _tile(logits_ptr, rows, E, ROWS, EP, SQRT_SOFTPLUS)
    slot = tl.arange(0, KP)
    k_on = live[:, None] & (slot < K)[None, :]
    k_at = row[:, None] * K + slot[None, :]
    ids = tl.load(ids_ptr + k_at, mask=k_on, other=0).to(tl.int32)
    w = tl.load(weights_ptr + k_at, mask=k_on, other=0.0).to(tl.float32)
    dw = tl.load(d_weights_ptr + k_at, mask=k_on, other=0.0).to(tl.float32)
    total = tl.zeros((ROWS,), tl.float32)
    for j in tl.static_range(K):
        total += _picked(s, ids, col, slot, j)
    dc = (scale * dw - tl.sum(dw * w, axis=1)[:, None]) / total[:, None]
    if HAS_D_SCORES:
        ds = tl.load(d_scores_ptr + at, mask=on, other=0.0).to(tl.float32)
    else:  # the scores unused (no sequence balance loss): not a tensor of zeros read
        ds = tl.zeros((ROWS, EP), tl.float32)
    for j in tl.static_range(K):
        at_id = col[None, :] == _slot(ids, slot, j)[:, None]
        ds += tl.where(at_id, _slot(dc, slot, j)[:, None], 0.0)
    # d sqrt(softplus(x)) = sigmoid(x) / (2 s); d sigmoid(x) = s (1 - s)
    dx = ds * tl.sigmoid(x) / (2.0 * s) if SQRT_SOFTPLUS else ds * s * (1.0 - s)
    tl.store(d_logits_ptr + at, dx.to(d_logits_ptr.dtype.element_ty), mask=on)


def _sizes(logits: torch.Tensor, top_k: int) -> dict:
    return {"K": top_k, "KP": triton.next_power_of_2(top_k), "ROWS": ROWS,
            "EP": triton.next_power_of_2(logits.shape[1])}  # fmt: skip


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, top_k, score_func, scale, given_ids, num_groups, topk_groups):
        logits = logits.contiguous()
        rows, experts = logits.shape
        choose = given_ids is None
        ids = logits.new_empty((rows, top_k), dtype=torch.int64) if choose else given_ids
        weights = logits.new_empty((rows, top_k), dtype=torch.float32)
        scores = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        sqrt_softplus = score_func == "sqrt_softplus"
        if rows:
            _forward[(triton.cdiv(rows, ROWS),)](
                logits, bias.contiguous(), ids.contiguous(), weights, scores, rows, experts,
                float(scale), CHOOSE=choose, SQRT_SOFTPLUS=sqrt_softplus, GROUPS=num_groups,
                GP=triton.next_power_of_2(num_groups), TOPK_GROUPS=topk_groups,
                **_sizes(logits, top_k),
            )  # fmt: skip
        ctx.mark_non_differentiable(ids)
        ctx.set_materialize_grads(False)  # an unused output's gradient: None, not zeros made
        ctx.save_for_backward(logits, ids, weights)
        ctx.scale, ctx.sqrt_softplus = scale, sqrt_softplus
        return weights, ids, scores

    @staticmethod
    def backward(ctx, d_weights, _d_ids, d_scores):
        logits, ids, weights = ctx.saved_tensors
        rows, experts = logits.shape
        d_logits = torch.empty_like(logits)
        if d_weights is None:
            d_weights = torch.zeros_like(weights)
        has_d_scores = d_scores is not None
        if rows:
            _backward[(triton.cdiv(rows, ROWS),)](
                logits, ids.contiguous(), weights, d_weights.contiguous(),
                d_scores.contiguous() if has_d_scores else d_logits, d_logits, rows, experts,
                float(ctx.scale), SQRT_SOFTPLUS=ctx.sqrt_softplus, HAS_D_SCORES=has_d_scores,
                **_sizes(logits, ids.shape[1]),
            )  # fmt: skip
        return d_logits, None, None, None, None, None, None, None


@register("moe_route", "triton")
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
    """The reference's `moe_route` in one launch each way (logits (N, E) float32)."""
    args = (logits, bias, top_k, score_func, route_scale, expert_ids, num_groups, topk_groups)
    if torch.compiler.is_compiling():  # inductor fuses the reference's expression
        return reference.moe_route(*args)
    if score_func not in reference.SCORE_FUNCS:
        raise ValueError(f"moe_route: score_func {score_func!r} is none of {reference.SCORE_FUNCS}")
    if logits.shape[-1] % num_groups:
        raise ValueError(f"moe_route: {logits.shape[-1]} experts do not split into {num_groups}")
    if expert_ids is not None:  # the groups only steer a choice: no kernel variant for them
        args = (*args[:6], 1, 1)
    return _Route.apply(*args)
