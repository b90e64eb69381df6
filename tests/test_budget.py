"""Sparse-parameter budget: exact accounting, the Engram/MoE split, paper-shaped configs."""

import pytest

from birkhoff.errors import RecipeError
from birkhoff.launch.recipe import load_recipe
from birkhoff.model import ModelConfig, build_model
from birkhoff.model.budget import apply_sparse_budget, count_parameters, expert_size
from birkhoff.model.config import (
    AttentionConfig,
    EngramConfig,
    MoEConfig,
    MTPConfig,
    ResidualConfig,
)
from birkhoff.model.engram import Engram
from birkhoff.model.moe import GroupedExperts
from birkhoff.model.summary import build_on_meta
from conftest import compose_recipe, small_model


def small_config(**changes) -> ModelConfig:
    """4 layers (3 MoE) with 2 Engram layers: every budget term is present."""
    base = {
        "vocab_size": 512,
        "hidden_size": 64,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "ffn_hidden_size": 128,
        "max_seq_len": 16,
        "moe": MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=32),
        "engram": EngramConfig(layers=[1, 2], table_size=100, embed_dim=8),
    }
    return small_model(**{**base, **changes})


def counted(model) -> tuple[int, int, int]:
    total = sum(p.numel() for p in model.parameters())
    tables = sum(m.table.weight.numel() for m in model.modules() if isinstance(m, Engram))
    experts = sum(
        p.numel() for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
    )
    return total, tables, experts


@pytest.mark.parametrize("mode", ["mhc", "plain"])
@pytest.mark.parametrize(
    ("budget", "fraction"),
    [(None, 0.25), (2_000_000, 0.0), (2_000_000, 0.25), (2_000_000, 1.0), (5_000_000, 0.5)],
)
def test_accounting_matches_counted_numel(mode, budget, fraction):
    cfg = small_config(
        residual=ResidualConfig(mode=mode), sparse_budget=budget, engram_fraction=fraction
    )
    model = build_model(cfg)
    count = count_parameters(model.cfg)
    assert (count.total, count.engram_tables, count.routed_experts) == counted(model)
    if budget is not None:
        moe_layers = 3  # first_k_dense=1 of 4 layers
        one_expert = expert_size(model.cfg) * moe_layers
        assert abs(count.sparse - budget) <= one_expert, "split exact to within one expert"
        assert count.engram_tables == pytest.approx(fraction * budget, rel=0.02, abs=one_expert)


def test_engram_fraction_zero_is_a_pure_moe_model():
    model = build_model(small_config(sparse_budget=2_000_000, engram_fraction=0.0))
    assert not any(isinstance(m, Engram) for m in model.modules())
    assert model.cfg.moe.num_experts == 2 + round(2_000_000 / (3 * 64 * 32 * 3))


def test_more_engram_means_fewer_experts_at_equal_sparse_size():
    sized = [
        apply_sparse_budget(small_config(sparse_budget=4_000_000, engram_fraction=f))
        for f in (0.0, 0.25, 0.5, 0.75)
    ]
    experts = [cfg.moe.num_experts for cfg in sized]
    tables = [cfg.engram.table_size if cfg.engram.layers else 0 for cfg in sized]
    assert experts == sorted(experts, reverse=True) and tables == sorted(tables)
    sparse = [count_parameters(cfg).sparse for cfg in sized]
    assert max(sparse) - min(sparse) <= 2 * 3 * 64 * 32 * 3


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"sparse_budget": 1000, "engram_fraction": 0.0}, "model.sparse_budget"),
        ({"sparse_budget": 10**6, "engram_fraction": 1.5}, "model.engram_fraction"),
        ({"sparse_budget": 10**6, "engram_fraction": -0.1}, "model.engram_fraction"),
        (
            {"sparse_budget": 10**6, "engram_fraction": 0.5, "engram": EngramConfig(layers=[])},
            "model.engram_fraction",
        ),
        ({"sparse_budget": 0}, "model.sparse_budget"),
    ],
)
def test_bad_budgets_fail_naming_the_field(changes, key):
    with pytest.raises(RecipeError) as info:
        build_model(small_config(**changes))
    assert info.value.key == key


@pytest.mark.parametrize(
    ("recipe", "total_range", "active_range"),
    [
        ("v4_flash_engram", (2.5e11, 3.0e11), (1.0e10, 1.5e10)),
        ("engram_27b", (2.6e10, 2.8e10), (3.5e9, 4.5e9)),
        ("small", (0.9e8, 1.2e8), (4e7, 7e7)),
    ],
)
def test_paper_shaped_recipes_are_counted_on_the_meta_device(recipe, total_range, active_range):
    cfg, _ = load_recipe(compose_recipe([f"model={recipe}"]), env={})
    model = build_on_meta(cfg.model)
    assert all(p.device.type == "meta" for p in model.parameters())
    count = count_parameters(model.cfg)
    assert sum(p.numel() for p in model.parameters()) == count.total
    assert total_range[0] < count.total < total_range[1]
    assert active_range[0] < count.active < active_range[1]
    if cfg.model.sparse_budget:
        assert abs(count.sparse - cfg.model.sparse_budget) <= expert_size(model.cfg) * 43


@pytest.mark.parametrize(
    ("recipe", "published_total", "published_active"),
    [("deepseek_v4_flash", 284e9, 13e9), ("deepseek_v4_pro", 1.6e12, 49e9)],
)
def test_released_v4_shapes_count_the_published_parameters(
    recipe, published_total, published_active
):
    """DeepSeek-V4-Flash (284B, 13B active) and -Pro (1.6T, 49B active), counted from their
    sizes alone and built on the meta device, give the published figures to their published
    precision. The published counts leave out the MTP module (an MoE block, in V4 and here)
    and count the head but not the embedding table among active parameters."""
    cfg, _ = load_recipe(compose_recipe([f"model={recipe}", "model.mtp.depth=0"]), env={})
    model = build_on_meta(cfg.model)
    count = count_parameters(model.cfg)
    assert sum(p.numel() for p in model.parameters()) == count.total
    digits = 3 if recipe.endswith("flash") else 2  # 284B; 1.6T
    scale = 10 ** (len(str(int(published_total))) - digits)
    assert round(count.total / scale) * scale == published_total
    active = count.active - model.cfg.vocab_size * model.cfg.hidden_size  # embedding table
    assert round(active / 1e9) * 1e9 == published_active


@pytest.mark.parametrize(
    "changes",
    [
        {"residual": ResidualConfig(mode="mhc", n_streams=1)},
        {"residual": ResidualConfig(mode="hc", n_streams=3)},
        {"tie_embeddings": True},
        {"mtp": MTPConfig(depth=2), "sparse_budget": 3_000_000},
    ],
)
def test_accounting_covers_every_variant(changes):
    model = build_model(small_config(**changes))
    count = count_parameters(model.cfg)
    assert (count.total, count.engram_tables, count.routed_experts) == counted(model)


def test_v4_attention_accounting_matches_counted_numel():
    """Every V4 layer type (sliding, CSA with its indexer, HCA) and an MTP block (sliding)."""
    attention = AttentionConfig(
        kind="v4",
        head_dim=16,
        rope_head_dim=4,
        q_lora_rank=24,
        o_groups=2,
        o_lora_rank=8,
        sliding_window=4,
        layer_types=["sliding", "csa", "hca", "csa"],
        csa_ratio=2,
        hca_ratio=4,
        index_heads=2,
        index_head_dim=8,
        index_topk=2,
    )
    model = build_model(small_config(attention=attention, mtp=MTPConfig(depth=1)))
    count = count_parameters(model.cfg)
    assert (count.total, count.engram_tables, count.routed_experts) == counted(model)
