"""MoE: routing semantics, balancing, grouped experts against a per-token loop, validation."""

import pytest
import torch
import torch.nn.functional as F

from birkhoff import kernels
from birkhoff.errors import RecipeError
from birkhoff.model import build_model
from birkhoff.model.config import MoEConfig
from birkhoff.model.moe import MoE, hash_routing_table
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
    assert metrics["moe_load_max_over_mean"] >= 1 >= metrics["moe_load_min_over_mean"]
    assert moe.tokens_per_expert.sum() == 0 and moe.router.bias.abs().sum() > 0


def test_swiglu_limit_clamps_routed_and_shared_experts_as_v4_does():
    """moe.swiglu_limit against V4's formula written out per token in float64: each expert is
    W_down(silu(min(x W_gate, L)) * clip(x W_up, -L, L)). The weights are large enough that
    all three bounds bind; the experts' weight gradients (zero through what was clipped)
    match too."""
    limit = 0.5
    moe = make_moe(swiglu_limit=limit)
    moe.experts.reset_parameters(1.0, 0.2)
    torch.nn.init.normal_(moe.shared.w_gate.weight, std=1.0)
    torch.nn.init.normal_(moe.shared.w_up.weight, std=1.0)
    x = torch.randn(1, 24, 16)
    out, _ = moe(x)
    weights, expert_ids, _ = moe.router(x.flatten(0, 1))

    def expert(v, w_gate, w_up, w_down):
        gate, up = v @ w_gate, v @ w_up
        bound = (gate > limit).any() and (up > limit).any() and (up < -limit).any()
        return (F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)) @ w_down, bound

    x64 = x.double().flatten(0, 1)
    params = [moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down]
    w = [p.detach().double().requires_grad_() for p in params]
    shared_params = [moe.shared.w_gate.weight, moe.shared.w_up.weight, moe.shared.w_down.weight]
    shared64 = [p.detach().double().requires_grad_() for p in shared_params]
    shared = [p.T for p in shared64]
    rows, binds = [], []
    for t in range(x64.shape[0]):
        row, bound = expert(x64[t], *shared)
        binds.append(bound)
        for k in range(expert_ids.shape[1]):
            e = int(expert_ids[t, k])
            routed, bound = expert(x64[t], w[0][e], w[1][e], w[2][e])
            row = row + weights[t, k].double() * routed
            binds.append(bound)
        rows.append(row)
    expected = torch.stack(rows)
    assert any(binds), "no clamp was active: the test would not see a missing one"
    torch.testing.assert_close(out.double().flatten(0, 1), expected, rtol=1e-5, atol=1e-6)
    probe = torch.randn_like(expected)
    (out.flatten(0, 1).double() * probe).sum().backward()
    (expected * probe).sum().backward()
    for param, param64 in zip(params + shared_params, w + shared64, strict=True):
        torch.testing.assert_close(param.grad.double(), param64.grad, rtol=1e-4, atol=1e-6)


def test_a_layer_that_lost_a_token_fails_the_step():
    """No capacity limit: each MoE layer routes exactly tokens x top_k slots per step (40 x
    2 here). Where it does not, routing is broken: the step fails instead of a metric
    that would always read 0."""
    moe = make_moe()
    moe.train()
    moe(torch.randn(1, 40, 16))
    moe.tokens_per_expert[3] -= 1
    with pytest.raises(RuntimeError, match="routed 79 token slots in the step, not 80"):
        balance_experts([moe], SINGLE_PROCESS, routed_per_layer=80)


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


@pytest.mark.parametrize(
    ("vocab", "experts", "top_k"), [(400, 8, 2), (1000, 3, 2), (50, 6, 6), (7, 5, 3), (97, 7, 3)]
)
def test_the_hash_table_is_balanced_distinct_and_seeded(vocab, experts, top_k):
    """Every token id gets top_k distinct experts, every expert serves as many ids as any
    other (+-1), and the table is a function of its seed."""
    table = hash_routing_table(vocab, experts, top_k, seed=3)
    assert table.shape == (vocab, top_k)
    assert all(len(set(row)) == top_k for row in table.tolist())
    served = torch.bincount(table.flatten(), minlength=experts)
    assert served.max() - served.min() <= 1 and served.sum() == vocab * top_k
    assert torch.equal(table, hash_routing_table(vocab, experts, top_k, seed=3))
    if top_k < experts:
        assert not torch.equal(table, hash_routing_table(vocab, experts, top_k, seed=4))


def test_a_hash_layer_routes_by_token_id_with_the_routers_weights():
    """V4's hash routing: the experts come from the table whatever the hidden state and the
    bias; the gate weights are the router's scores of those experts, normalised, times
    route_scale (written out here); balancing leaves the bias alone."""
    table = hash_routing_table(50, 8, 2, seed=0)
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=8, top_k=2, route_scale=1.5), "reference", table)
    moe.router.reset_parameters(0.5)
    moe.experts.reset_parameters(0.2, 0.2)
    moe.router.bias[3] = 100.0  # would force expert 3 into every top-k of a learned router
    tokens = torch.randint(0, 50, (2, 12))
    x = torch.randn(2, 12, 16)
    weights, expert_ids, _ = moe.router(x.flatten(0, 1), tokens.flatten())
    assert torch.equal(expert_ids, table[tokens.flatten()])
    chosen = torch.sigmoid(x.flatten(0, 1) @ moe.router.weight.T).gather(-1, expert_ids)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * 1.5)
    moe.train()
    moe(x, tokens)
    assert moe.tokens_per_expert.sum() == 2 * 12 * 2
    balance_experts([moe], SINGLE_PROCESS, routed_per_layer=2 * 12 * 2)
    assert moe.router.bias[3] == 100.0 and moe.router.bias.count_nonzero() == 1


def test_hash_layers_follow_the_dense_ones_and_validate():
    def hashed_model(hash_layers: int):
        moe = MoEConfig(num_experts=8, first_k_dense=1, hash_layers=hash_layers)
        return build_model(small_model(num_layers=4, moe=moe))

    model = hashed_model(2)
    tables = {
        name: block.ffn.router.hash_table
        for name, block in model.blocks.items()
        if isinstance(block.ffn, MoE) and block.ffn.router.hash_table is not None
    }
    assert list(tables) == ["1", "2"]
    assert not torch.equal(tables["1"], tables["2"])  # each layer draws its own
    with pytest.raises(RecipeError, match=r"model\.moe\.hash_layers.*must be in \[0, 3\]"):
        hashed_model(4)


def test_the_cpu_moe_ops_refuse_orders_that_are_not_permutations():
    """The C kernels index rows by the order and its inverse: an order out of range or with a
    repeated slot is refused before any kernel reads by it (torch.ops.birkhoff.cpu_* are
    public). The custom ops pass opcheck (schema, fake tensors, autograd registration)."""
    from birkhoff.kernels import cpu_moe

    tokens, rows, weights = torch.randn(3, 8), torch.randn(6, 8), torch.rand(3, 2)
    with pytest.raises(RuntimeError, match="outside"):
        cpu_moe.permute_op(tokens, torch.tensor([0, 1, 2, 3, 4, 6]), 2)
    with pytest.raises(RuntimeError, match="not a permutation"):
        cpu_moe.unpermute_op(rows, torch.tensor([0, 1, 2, 3, 4, 4]), weights)
    with pytest.raises(RuntimeError, match="int64 order"):
        cpu_moe.permute_op(tokens, torch.arange(6, dtype=torch.int32), 2)
    order = torch.randperm(6)
    torch.library.opcheck(cpu_moe.permute_op, (tokens.requires_grad_(), order, 2))
    torch.library.opcheck(
        cpu_moe.unpermute_op, (rows.requires_grad_(), order, weights.requires_grad_())
    )
