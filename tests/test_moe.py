"""MoE: routing semantics, balancing, grouped experts against a per-token loop, validation."""

import pytest
import torch
import torch.nn.functional as F

from birkhoff import kernels
from birkhoff.errors import RecipeError
from birkhoff.model import build_model
from birkhoff.model.config import MoEConfig
from birkhoff.model.moe import MoE
from birkhoff.parallel.distributed import DistributedContext
from birkhoff.train.expert_balance import balance_experts
from conftest import small_model

SINGLE_PROCESS = DistributedContext(rank=0, local_rank=0, world_size=1, mesh=None)


def make_moe(**changes) -> MoE:
    torch.manual_seed(0)
    cfg = MoEConfig(**{"num_experts": 8, "top_k": 2, "expert_ffn_hidden_size": 16, **changes})
    moe = MoE(16, cfg, "reference")
    moe.router.reset_parameters(0.5)
    moe.experts.reset_parameters(0.2, 0.2)
    return moe


def test_selection_uses_biased_scores_and_weights_use_unbiased_ones():
    router = make_moe(route_scale=2.5).router
    x = torch.randn(64, 16)
    router.bias[5] = 10.0  # selection bias only
    weights, ids, scores = router(x)
    assert (ids == 5).any(-1).all(), "a large bias forces expert 5 into every top-k"
    chosen = torch.sigmoid(x @ router.weight.T).gather(-1, ids)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * 2.5)
    torch.testing.assert_close(scores, torch.sigmoid(x @ router.weight.T))


def test_sqrt_softplus_scores():
    router = make_moe(score_func="sqrt_softplus").router
    x = torch.randn(10, 16)
    _, _, scores = router(x)
    torch.testing.assert_close(scores, F.softplus(x @ router.weight.T).sqrt())


def test_group_limited_routing_picks_experts_from_the_best_groups_only():
    router = make_moe(num_groups=4, topk_groups=2, top_k=3).router
    _, ids, _ = router(torch.randn(256, 16))
    groups_used = (ids // 2).sort(-1).values
    assert all(len(set(row.tolist())) <= 2 for row in groups_used)


def per_token_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE written the slow, obvious way: each token through its k experts (+ shared)."""
    weights, ids, _ = moe.router(x.flatten(0, 1))
    outputs = []
    for t, token in enumerate(x.flatten(0, 1)):
        total = moe.shared(token) if moe.shared is not None else torch.zeros_like(token)
        for slot in range(moe.cfg.top_k):
            e = int(ids[t, slot])
            hidden = F.silu(token @ moe.experts.w_gate[e]) * (token @ moe.experts.w_up[e])
            total = total + weights[t, slot] * (hidden @ moe.experts.w_down[e])
        outputs.append(total)
    return torch.stack(outputs)


def test_moe_output_equals_a_per_token_loop():
    moe = make_moe(num_shared_experts=1)
    x = torch.randn(2, 7, 16)
    out, _ = moe(x)
    torch.testing.assert_close(out.flatten(0, 1), per_token_loop(moe, x), atol=1e-5, rtol=1e-5)


def test_permute_and_unpermute_round_trip():
    permute, unpermute = kernels.get("moe_permute"), kernels.get("moe_unpermute")
    tokens = torch.randn(5, 3)
    ids = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1], [0, 2]])
    permuted, order, counts = permute(tokens, ids, 3)
    assert counts.tolist() == [3, 3, 4]
    assert (ids.flatten()[order].diff() >= 0).all(), "rows are grouped by expert"
    ones = torch.full((5, 2), 0.5)
    torch.testing.assert_close(unpermute(permuted, order, ones, 5), tokens)


def test_sequence_balance_loss_matches_the_formula():
    moe = make_moe(seq_aux_loss_coef=0.1)
    x = torch.randn(3, 5, 16)
    _, loss = moe(x)
    _, ids, scores = moe.router(x.flatten(0, 1))
    chosen = torch.zeros(15, 8).scatter(-1, ids, 1.0).view(3, 5, 8)
    f = chosen.sum(1) * 8 / (2 * 5)
    p = (scores / scores.sum(-1, keepdim=True)).view(3, 5, 8).mean(1)
    torch.testing.assert_close(loss, 0.1 * (f * p).sum(-1).mean())
    assert make_moe()(x)[1].item() == 0.0


def test_bias_updates_push_a_skewed_stream_toward_uniform_load():
    moe = make_moe(bias_update_rate=1e-3)
    generator = torch.Generator().manual_seed(0)
    skew = moe.router.weight[0].detach() * 0.5  # inputs lean toward expert 0
    moe.train()

    def imbalance_over(steps: int) -> float:
        total = torch.zeros(8)
        for _ in range(steps):
            x = torch.randn(256, 16, generator=generator) + skew
            moe(x.unsqueeze(0))
            total += moe.tokens_per_expert
            balance_experts([moe], SINGLE_PROCESS, routed_per_layer=256 * 2)
        return (total.max() / total.mean()).item()

    before = imbalance_over(1)
    imbalance_over(200)
    after = imbalance_over(20)
    assert after - 1 < (before - 1) / 2, (before, after)
    print({"max_over_mean_before": before, "after_200_steps": after})


def test_balance_metrics_and_reset():
    moe = make_moe()
    moe.train()
    moe(torch.randn(1, 40, 16))
    metrics = balance_experts([moe], SINGLE_PROCESS, routed_per_layer=80)
    assert metrics["moe_dropped_tokens"] == 0
    assert metrics["moe_load_max_over_mean"] >= 1 >= metrics["moe_load_min_over_mean"]
    assert moe.tokens_per_expert.sum() == 0 and moe.router.bias.abs().sum() > 0


def test_first_k_dense_layers_keep_a_dense_ffn():
    cfg = small_model(
        num_layers=3,
        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=8, first_k_dense=2),
    )
    kinds = [type(block.ffn).__name__ for block in build_model(cfg).blocks.values()]
    assert kinds == ["SwiGLU", "SwiGLU", "MoE"]


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"top_k": 9}, "model.moe.top_k"),
        ({"num_groups": 3}, "model.moe.num_groups"),
        ({"num_groups": 4, "topk_groups": 5}, "model.moe.topk_groups"),
        ({"num_groups": 4, "topk_groups": 1, "top_k": 3}, "model.moe.top_k"),
        ({"score_func": "softmax"}, "model.moe.score_func"),
        ({"first_k_dense": 5}, "model.moe.first_k_dense"),
    ],
)
def test_bad_moe_configs_fail_naming_the_field(changes, key):
    moe = MoEConfig(**{"num_experts": 8, "top_k": 2, **changes})
    cfg = small_model(
        num_layers=3,
        moe=moe,
    )
    with pytest.raises(RecipeError) as info:
        build_model(cfg)
    assert info.value.key == key


def test_gradients_match_the_per_token_loop():
    moe = make_moe(num_shared_experts=0)
    x = torch.randn(1, 9, 16)
    moe(x)[0].square().sum().backward()
    got = [moe.router.weight.grad.clone(), moe.experts.w_gate.grad.clone()]
    moe.zero_grad()
    per_token_loop(moe, x).square().sum().backward()
    torch.testing.assert_close(got[0], moe.router.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], moe.experts.w_gate.grad, atol=1e-5, rtol=1e-4)


def test_group_limited_routing_keeps_the_groups_with_the_best_two_scores():
    router = make_moe(num_groups=4, topk_groups=2, top_k=2).router
    x = torch.randn(128, 16)
    _, ids, scores = router(x)
    best_groups = scores.view(128, 4, 2).topk(2, dim=-1).values.sum(-1).topk(2, -1).indices
    for row, groups in zip(ids // 2, best_groups, strict=True):
        assert set(row.tolist()) <= set(groups.tolist())


def test_router_scores_stay_fp32_under_bf16_autocast():
    router = make_moe().router
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights, _, scores = router(torch.randn(8, 16).bfloat16())
    assert scores.dtype == weights.dtype == torch.float32
