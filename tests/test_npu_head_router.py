"""The head's fused cross-entropy (kernels/npu_cross_entropy.py) and the MoE router
(kernels/npu_router.py) on the `npu` backend, through a stand-in torch_npu computing what the
operators' docs specify (tests/npu_stand_in.py): against the reference in float64 (the head,
bfloat16 matmuls) or float32 (the router), forward and gradients; the calls the operators do
not take run the reference and call nothing; the kernel table names the limits. The calls'
signatures are checked against the wheel's docs in test_npu_backend.py."""

from __future__ import annotations

import pytest
import torch

from birkhoff import kernels

HEAD_CALLS = [
    "npu_fused_linear_online_max_sum",
    "npu_fused_cross_entropy_loss_with_max_sum",
    "npu_fused_linear_cross_entropy_loss_with_max_sum_backward",
]
ROUTER_CALLS = ["npu_moe_gating_top_k", "npu_moe_gating_top_k_backward"]
BF16_BOUND = 1e-2  # relative error of bfloat16 matmuls' outputs and gradients


def relative(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_the_fused_head_matches_the_float64_loss_and_gradients(stand_in, weight_dtype):
    """bfloat16 hidden states (autocast's) and a float32 or bfloat16 weight: the mean loss
    and the gradients of both against cross_entropy(hidden @ weight^T) in float64, the
    weight's gradient in the weight's dtype; three operator calls, the logits never whole."""
    torch.manual_seed(0)
    tokens, width, vocab = 37, 32, 300
    hidden = torch.randn(tokens, width).bfloat16()
    weight = (torch.randn(vocab, width) / 4).to(weight_dtype)
    targets = torch.randint(0, vocab, (tokens,))
    exact = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    expected = torch.nn.functional.cross_entropy(exact[0] @ exact[1].T, targets)
    given = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    got = kernels.get("linear_cross_entropy", "npu")(*given, targets)
    assert stand_in.calls == HEAD_CALLS[:2]
    assert got.dtype == torch.float32 and relative(got, expected) < BF16_BOUND
    grad = torch.tensor(1.7)
    expected_grads = torch.autograd.grad(expected, exact, grad.double())
    got_grads = torch.autograd.grad(got, given, grad)
    assert stand_in.calls == HEAD_CALLS
    for g, e, t in zip(got_grads, expected_grads, given, strict=True):
        assert g.dtype == t.dtype and relative(g, e) < BF16_BOUND


def test_head_calls_the_operators_do_not_take_run_the_reference(stand_in):
    """float32 hidden states outside autocast (the operators take bfloat16 and float16) and a
    vocabulary under 128 (the backward's least) run the reference, calling nothing; without
    autograd only the forward operators run."""
    torch.manual_seed(1)
    npu_op, reference = (kernels.get("linear_cross_entropy", b) for b in ("npu", "reference"))
    hidden, weight = torch.randn(9, 16), torch.randn(200, 16)
    targets = torch.randint(0, 100, (9,))
    assert torch.equal(npu_op(hidden, weight, targets), reference(hidden, weight, targets))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in a model: a float32 weight
        hidden = torch.randn(9, 16).bfloat16()
        small = torch.randn(100, 16)
        assert torch.equal(npu_op(hidden, small, targets), reference(hidden, small, targets))
        assert stand_in.calls == []
        with torch.no_grad():
            loss, expected = npu_op(hidden, weight, targets), reference(hidden, weight, targets)
    assert stand_in.calls == HEAD_CALLS[:2]
    assert relative(loss, expected.double()) < BF16_BOUND


def test_float32_hidden_states_under_autocast_go_through_the_operators(stand_in):
    """A plain residual stream reaches the head in float32 under autocast: the op casts it
    (and the weight) as autocast casts them for head(x), and its gradient comes back in
    float32; the tables count it by autocast's dtype."""
    torch.manual_seed(4)
    hidden = torch.randn(21, 32, requires_grad=True)
    weight = (torch.randn(160, 32) / 4).requires_grad_()
    targets = torch.randint(0, 160, (21,))
    exact = [t.detach().bfloat16().double().requires_grad_() for t in (hidden, weight)]
    expected = torch.nn.functional.cross_entropy(exact[0] @ exact[1].T, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kernels.get("linear_cross_entropy", "npu")(hidden, weight, targets)
    assert stand_in.calls == HEAD_CALLS[:2] and relative(got, expected) < BF16_BOUND
    got_grads = torch.autograd.grad(got, (hidden, weight))
    for g, e, t in zip(got_grads, torch.autograd.grad(expected, exact), (hidden, weight),
                       strict=True):  # fmt: skip
        assert g.dtype == t.dtype == torch.float32 and relative(g, e) < BF16_BOUND


def test_a_second_backward_scales_the_first_one_s_gradients(stand_in):
    """A zero-bubble schedule runs a stage's backward twice (inputs, then weights): the
    second scales the gradients the first computed, with no operator call again."""
    torch.manual_seed(6)
    hidden = torch.randn(13, 32).bfloat16().requires_grad_()
    weight = torch.randn(140, 32).bfloat16().requires_grad_()
    targets = torch.randint(0, 140, (13,))
    exact = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    expected = torch.nn.functional.cross_entropy(exact[0] @ exact[1].T, targets)
    d_hidden, d_weight = torch.autograd.grad(expected, exact)
    loss = kernels.get("linear_cross_entropy", "npu")(hidden, weight, targets)
    (first,) = torch.autograd.grad(loss, hidden, torch.tensor(2.0), retain_graph=True)
    (second,) = torch.autograd.grad(loss, weight, torch.tensor(3.0))
    assert stand_in.calls == HEAD_CALLS  # one backward operator call for both
    assert relative(first, 2 * d_hidden) < BF16_BOUND
    assert relative(second, 3 * d_weight) < BF16_BOUND


def route_inputs(tokens: int = 24, experts: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits whose biased top-k is far from ties (float32 and the stand-in agree)."""
    spread = torch.argsort(torch.rand(tokens, experts), -1).float() / experts * 8 - 4
    return spread + 0.01 * torch.randn(tokens, experts), 0.3 * torch.randn(experts)


def check_route(expert_ids: torch.Tensor | None, groups: tuple[int, int] = (1, 1)) -> None:
    """The npu router against the reference's: the same experts, gate weights and scores,
    and the logits' gradient from both the weights and the scores (a balance loss's use)."""
    logits, bias = route_inputs()
    outputs, grads = [], []
    for backend in ("reference", "npu"):
        leaf = logits.clone().requires_grad_()
        weights, ids, scores = kernels.get("moe_route", backend)(
            leaf, bias, 4, "sigmoid", 2.5, expert_ids, *groups
        )
        torch.manual_seed(5)  # the same upstream gradients for both
        upstream = (torch.randn_like(weights), torch.randn_like(scores))
        (grad,) = torch.autograd.grad((weights, scores), leaf, upstream)
        outputs.append((weights, ids, scores))
        grads.append(grad)
    (w_ref, ids_ref, s_ref), (w_npu, ids_npu, s_npu) = outputs
    if expert_ids is None:  # the bias steered some choices (it is the operator's to apply)
        assert not torch.equal(ids_ref, s_ref.topk(4, dim=-1).indices)
    assert ids_npu.dtype == torch.int64 and torch.equal(ids_npu, ids_ref)
    torch.testing.assert_close(w_npu, w_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_npu, s_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_the_router_matches_the_reference(stand_in):
    torch.manual_seed(2)
    check_route(None)
    assert stand_in.calls == ROUTER_CALLS


@pytest.mark.parametrize(
    "groups", [(4, 2), (8, 3)], ids=["the operator's groups", "2 experts a group: hash mode"]
)
def test_group_limited_routing_matches_the_reference(stand_in, groups):
    """V3's group-limited routing: in the operator where its limits allow (more than 2
    experts a group), else chosen as the reference chooses and handed in as a hash table."""
    torch.manual_seed(4)
    check_route(None, groups)
    assert stand_in.calls == ROUTER_CALLS
    # V3's top-2 group scores in the operator; 2 experts a group: none (the hash table's)
    assert stand_in.gating_groups == [(4, 2, 1) if groups == (4, 2) else (1, 1, 0)]
    torch.manual_seed(4)
    logits, bias = route_inputs()  # check_route's
    _, unlimited, _ = kernels.get("moe_route", "reference")(logits, bias, 4, "sigmoid", 1.0)
    _, limited, _ = kernels.get("moe_route", "npu")(logits, bias, 4, "sigmoid", 1.0, None, *groups)
    assert not torch.equal(limited, unlimited)  # the groups changed some choices


def test_experts_chosen_elsewhere_go_through_the_hash_mode(stand_in):
    """A hash layer's (or Anticipatory Routing's) experts: row i takes tid2eid[i]; the weights
    are those experts' normalised scores, whatever the bias would have chosen."""
    torch.manual_seed(3)
    chosen = torch.stack([torch.randperm(16)[:4] for _ in range(24)])
    check_route(chosen)
    assert stand_in.calls == ROUTER_CALLS


def test_router_calls_the_operator_does_not_take_run_the_reference(stand_in):
    """V4's sqrt(softplus) scores and fewer than 3 experts run the reference."""
    logits, bias = route_inputs()
    npu_op, reference = (kernels.get("moe_route", b) for b in ("npu", "reference"))
    for args in [(logits, bias, 4, "sqrt_softplus", 2.5), (logits[:, :2], bias[:2], 1,
                                                          "sigmoid", 1.0)]:  # fmt: skip
        for got, expected in zip(npu_op(*args), reference(*args), strict=True):
            assert torch.equal(got, expected)
    assert stand_in.calls == []


def test_the_table_names_the_head_and_router_limits(stand_in):
    line = kernels.describe("npu", torch.bfloat16)
    assert "linear_cross_entropy (bfloat16 or float16 only; vocabularies of 128" in line
    assert "moe_route (sigmoid scores only, 3 to 2,048 experts)" in line
    fp32 = kernels.implementations("npu", torch.float32)
    assert fp32["linear_cross_entropy"] == "reference" and fp32["moe_route"] == "npu"
