"""The MoE router after its matmul (`moe_route`): the triton backend's kernel (interpreted)
and the reference in float32 against the reference in float64, forward (gate weights, expert
ids, scores) and the logits' gradient from the weights' and the scores' gradients; and the
reference against the routing formula written out per token."""

from __future__ import annotations

import math

import pytest
import torch

from birkhoff import kernels

pytest.importorskip("triton")


def inputs(tokens: int, experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits whose biased scores never tie (each token's are a permutation of
    evenly spread values, plus a little noise) and a small bias."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.argsort(torch.rand(tokens, experts, generator=g), -1).double()
    logits = spread / experts * 8 - 4 + 0.01 * torch.randn(tokens, experts, generator=g).double()
    return logits, 0.01 * torch.randn(experts, generator=g).double()


GROUPS = {"no groups": (1, 1), "4 groups keep 2": (4, 2), "V3's 8 keep 4": (8, 4)}


@pytest.mark.parametrize("score_func", ["sigmoid", "sqrt_softplus"])
@pytest.mark.parametrize("given", [False, True], ids=["chosen", "given ids"])
@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(37, 12, 3), (5, 256, 8), (16, 8, 1)])
@pytest.mark.parametrize("groups", GROUPS.values(), ids=GROUPS.keys())
def test_moe_route_matches_the_float64_reference(score_func, given, tokens, experts, top_k, groups):
    if experts % groups[0] or top_k > groups[1] * experts // groups[0]:
        pytest.skip("the experts do not split into these groups, or the kept hold too few")
    logits, bias = inputs(tokens, experts, seed=tokens + experts)
    g = torch.Generator().manual_seed(1)
    ids = (
        torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
        if given
        else None
    )
    exact = logits.clone().requires_grad_()
    expected = kernels.get("moe_route", "reference")(
        exact, bias, top_k, score_func, 2.5, ids, *groups
    )
    d_weights = torch.randn(tokens, top_k, generator=g).double()
    d_scores = torch.randn(tokens, experts, generator=g).double()
    (expected_grad,) = torch.autograd.grad(
        (expected[0] * d_weights).sum() + (expected[2] * d_scores).sum(), exact
    )
    for backend in ("reference", "triton"):
        x = logits.float().requires_grad_()
        weights, got_ids, scores = kernels.get("moe_route", backend)(
            x, bias.float(), top_k, score_func, 2.5, ids, *groups
        )
        assert torch.equal(got_ids, expected[1]), backend
        assert weights.dtype == scores.dtype == torch.float32
        torch.testing.assert_close(weights.double(), expected[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(scores.double(), expected[2], rtol=1e-6, atol=1e-6)
        (grad,) = torch.autograd.grad(
            (weights * d_weights.float()).sum() + (scores * d_scores.float()).sum(), x
        )
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


def test_the_logits_gradient_from_the_weights_alone():
    """The scores unused (no sequence balance loss): the weights' gradient alone, as the
    reference gives it, with no zeros made for the scores' gradient."""
    logits, bias = inputs(21, 12, seed=5)
    grads = []
    for backend in ("reference", "triton"):
        x = logits.clone().float().requires_grad_()
        weights, _, _ = kernels.get("moe_route", backend)(x, bias.float(), 2, "sigmoid", 1.0)
        grads.append(torch.autograd.grad((weights * torch.arange(2.0)).sum(), x)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_the_triton_scores_hold_float32_accuracy_over_the_logits_range():
    """sqrt(softplus(x)) from x = -30 to 30 (where log(1 + exp(x)) loses digits) and sigmoid,
    each within a few float32 roundings of float64 (of the same float32 logits)."""
    logits = torch.linspace(-30, 30, 601).double()[None].repeat(2, 1)
    for score_func, exact in (
        ("sqrt_softplus", torch.nn.functional.softplus(logits).sqrt()),
        ("sigmoid", torch.sigmoid(logits)),
    ):
        _, _, scores = kernels.get("moe_route", "triton")(
            logits.float(), torch.zeros(601), 2, score_func, 1.0
        )
        error = ((scores.double() - exact).abs() / exact).max().item()
        assert error < 4 * 2**-24, (score_func, error)


def test_the_reference_routes_as_the_formula_per_token():
    """Per token: the k largest scores + bias (largest first), weights = scale x chosen
    score / sum of the chosen scores, scores = sqrt(log(1 + e^x)); a plain loop."""
    logits, bias = inputs(9, 6, seed=3)
    weights, ids, scores = kernels.get("moe_route", "reference")(
        logits, bias, 2, "sqrt_softplus", 1.5
    )
    for t in range(9):
        s = [math.sqrt(math.log1p(math.exp(v))) for v in logits[t].tolist()]
        order = sorted(range(6), key=lambda e: s[e] + bias[e].item(), reverse=True)[:2]
        assert ids[t].tolist() == order
        total = sum(s[e] for e in order)
        assert weights[t].tolist() == pytest.approx([1.5 * s[e] / total for e in order], rel=1e-12)
        assert scores[t].tolist() == pytest.approx(s, rel=1e-12)


@pytest.mark.parametrize(("experts", "groups", "kept", "top_k"), [(12, 4, 2, 4), (12, 6, 2, 3)])
def test_the_reference_limits_the_groups_as_the_formula_per_token(experts, groups, kept, top_k):
    """V3's group-limited routing per token: a group's score the sum of its two best biased
    scores (its one where it holds one expert), the `kept` best groups, then the k largest
    biased scores among their experts; a plain loop."""
    tokens, per = 11, experts // groups
    logits, bias = inputs(tokens, experts, seed=7)
    _, ids, _ = kernels.get("moe_route", "reference")(
        logits, bias, top_k, "sigmoid", 1.0, None, groups, kept
    )
    unlimited = 0
    for t in range(tokens):
        pairs = zip(logits[t].tolist(), bias.tolist(), strict=True)
        biased = [1 / (1 + math.exp(-v)) + b for v, b in pairs]
        score = [sum(sorted(biased[g * per : (g + 1) * per])[-2:]) for g in range(groups)]
        best = sorted(range(groups), key=lambda g: score[g], reverse=True)[:kept]
        allowed = [e for e in range(experts) if e // per in best]
        assert ids[t].tolist() == sorted(allowed, key=lambda e: biased[e], reverse=True)[:top_k]
        unlimited += ids[t].tolist() != sorted(range(experts), key=lambda e: -biased[e])[:top_k]
    assert unlimited  # the limit changed some tokens' choice
