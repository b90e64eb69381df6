"""The parallel layout is validated before any process group exists: every impossible layout
is one RecipeError naming the key, the numbers and a valid alternative."""

import pytest

from birkhoff.errors import RecipeError
from birkhoff.launch.recipe import load_recipe
from birkhoff.parallel.config import ParallelConfig
from conftest import compose_recipe


def layout_error(overrides: list[str]) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(compose_recipe(overrides), env={})
    return info.value


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (
            ["parallel.dp_shard=3", "launch.nproc_per_node=2"],
            "parallel.dp_shard",
            "1 x 3 x 1 x 1 = 3 must equal the world size 2",
        ),
        (
            ["parallel.dp_replicate=3", "launch.nproc_per_node=2"],
            "parallel.dp_replicate",
            "multiply to 3, which does not divide the world size 2",
        ),
        (
            ["parallel.tp=4", "launch.nproc_per_node=4"],
            "parallel.tp",
            "must divide model.num_heads=6; use one of [1, 2]",
        ),
        (  # V4 attention splits its output groups (and query and indexer heads) too
            ["model.attention.kind=v4", "model.attention.o_groups=3", "parallel.tp=2",
             "launch.nproc_per_node=2"],
            "parallel.tp",
            "must divide model.attention.o_groups=3; use one of [1]",
        ),
        (
            ["parallel.dp_shard=3", "parallel.ep=3", "launch.nproc_per_node=3",
             "train.global_batch_size=24", "train.micro_batch_size=8"],
            "parallel.ep",
            "must divide model.moe.num_experts=8; use one of [1, 2, 4, 8]",
        ),
        (
            ["parallel.tp=2", "parallel.ep=2", "launch.nproc_per_node=2"],
            "parallel.ep",
            "must divide dp_shard=1",
        ),
        (
            ["parallel.pp=3", "launch.nproc_per_node=3", "train.micro_batch_size=4"],
            "parallel.pp",
            "3 stages must divide model.num_layers=4, or set parallel.pp_split to layers per "
            "stage (e.g. [2, 1, 1])",
        ),
        (
            ["parallel.pp=2", "parallel.pp_split=[1,2]", "launch.nproc_per_node=2",
             "train.micro_batch_size=4"],
            "parallel.pp_split",
            "summing to model.num_layers=4",
        ),
        (
            ["parallel.pp=2", "launch.nproc_per_node=2", "train.micro_batch_size=12"],
            "train.micro_batch_size",
            "1 micro-batches per step, fewer than pp=2",
        ),
        (
            ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "launch.nproc_per_node=2"],
            "parallel.pp_stages_per_rank",
            "must be >= 2 for pp_schedule=interleaved_1f1b",
        ),
        (  # 5 micro-batches in 2 rounds: torch's schedule would refuse it at the first step
            ["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.pp_stages_per_rank=2",
             "launch.nproc_per_node=2", "train.global_batch_size=10", "train.micro_batch_size=2"],
            "train.micro_batch_size",
            "gives 5 micro-batches per step; pp_schedule=zero_bubble runs them in 2 rounds",
        ),
        (
            ["parallel.pp_schedule=zero_bubble", "parallel.pp_stages_per_rank=2"],
            "parallel.pp_schedule",
            "needs pp > 1",
        ),
        (
            ["parallel.pp=2", "model.tie_embeddings=true", "launch.nproc_per_node=2",
             "train.micro_batch_size=6"],
            "model.tie_embeddings",
            "must be false with pp > 1",
        ),
        (["parallel.pp_schedule=dualpipe"], "parallel.pp_schedule", "one of gpipe, 1f1b"),
        (
            ["parallel.activation_checkpoint=some"],
            "parallel.activation_checkpoint",
            "one of none, full, selective",
        ),
        (
            ["parallel.param_dtype=bfloat16"],
            "parallel.param_dtype",
            "applies to FSDP2 only",
        ),
        (
            ["parallel.dp_replicate=-1", "parallel.dp_shard=-1"],
            "parallel.dp_replicate",
            "cannot both be -1",
        ),
        (
            ["parallel.sequence_parallel=true"],
            "parallel.sequence_parallel",
            "needs tp > 1",
        ),
        (
            ["parallel.tp=2", "parallel.sequence_parallel=true", "launch.nproc_per_node=2",
             "data.seq_len=127"],
            "data.seq_len",
            "must be a multiple of parallel.tp=2 with parallel.sequence_parallel=true (each tp "
            "rank holds seq_len / tp positions); e.g. 126",
        ),
    ],
)  # fmt: skip
def test_impossible_layouts_are_refused_before_any_group_exists(overrides, key, message):
    err = layout_error(overrides)
    assert err.key == key
    assert message in str(err)


@pytest.mark.parametrize(
    ("settings", "world", "degrees"),
    [
        ({}, 8, (1, 8, 1, 1, 1)),
        ({"tp": 2, "pp": 2}, 8, (1, 2, 2, 2, 1)),
        ({"dp_replicate": 2, "ep": 2}, 8, (2, 4, 1, 1, 2)),
        ({"dp_replicate": -1, "dp_shard": 4}, 32, (8, 4, 1, 1, 1)),
    ],
)
def test_minus_one_takes_what_the_other_degrees_leave(settings, world, degrees):
    cfg = ParallelConfig(**settings)
    cfg.validate(world)
    names = ("dp_replicate", "dp_shard", "tp", "pp", "ep")
    assert cfg.degrees(world) == dict(zip(names, degrees, strict=True))


def test_the_default_recipe_shards_over_every_rank_and_ddp_is_pure_replication():
    assert ParallelConfig().uses_fsdp(4) and not ParallelConfig().uses_ddp(4)
    replicated = ParallelConfig(dp_replicate=-1, dp_shard=1)
    assert replicated.uses_ddp(4) and not replicated.uses_fsdp(4)
    assert not ParallelConfig().uses_fsdp(1)
