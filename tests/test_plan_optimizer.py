"""`birkhoff plan`'s optimizer state for V4.1's Sinkhorn-balanced table update and the spike
guard's host snapshots: against the formula written out, and against the bytes a snapshot of
a real model and optimizer holds (train/snapshot.py)."""

from __future__ import annotations

import pytest
import torch
from test_plan import CLUSTER, DENSE, KV, C, F, H, L, V, dense_parameters

from birkhoff.launch.dry_run import rank_share
from birkhoff.launch.recipe import typed_recipe
from birkhoff.model import build_model
from birkhoff.model.config import EngramConfig, MoEConfig
from birkhoff.model.init import clean_name
from birkhoff.parallel.muon_exchange import owner_group_size
from birkhoff.parallel.planning.communication import communication, muon_owner_group
from birkhoff.parallel.planning.estimate import GIB, estimate
from birkhoff.parallel.planning.inventory import build_inventory
from birkhoff.parallel.planning.layout import Layout, Workload, layout_of
from birkhoff.parallel.planning.search import check_runnable
from birkhoff.train.config import OptimConfig
from birkhoff.train.muon import _owned
from birkhoff.train.optim import build_optimizer
from birkhoff.train.snapshot import take_snapshot
from conftest import SMALL_OVERRIDES, compose_recipe, small_model

WORK = Workload(global_batch=8, seq_len=32)


def test_balanced_tables_keep_one_buffer_and_snapshots_cost_the_state_on_the_host():
    """fsdp=2: the embedding and the head (V x C each) keep one float32 buffer under the
    Sinkhorn-balanced update, AdamW's two elsewhere; two host snapshots hold twice the rank's
    parameters, buffers and optimizer state."""
    inv = build_inventory(DENSE)
    p, tables = dense_parameters(), 2 * V * C
    adamw = estimate(inv, Layout(dp_shard=2), WORK, CLUSTER)
    balanced = estimate(inv, Layout(dp_shard=2, balanced_tables=True), WORK, CLUSTER)
    assert adamw.memory_gib["optimizer"] * GIB == pytest.approx(8 * p / 2)
    assert balanced.memory_gib["optimizer"] * GIB == pytest.approx(
        (8 * (p - tables) + 4 * tables) / 2
    )
    kept = estimate(inv, Layout(dp_shard=2, balanced_tables=True, host_snapshots=2), WORK,
                    CLUSTER)  # fmt: skip
    buffers = sum(inv.buffer_bytes.values())
    state = (4 * p + 8 * (p - tables) + 4 * tables) / 2 + buffers
    assert kept.memory_gib["host"] * GIB == pytest.approx(2 * state)
    assert balanced.memory_gib["host"] == 0
    assert kept.memory_gib["total"] == balanced.memory_gib["total"]  # nothing on the device


def test_balanced_tables_with_sparse_engram_updates_are_refused():
    from birkhoff.errors import RecipeError

    inv = build_inventory(DENSE)
    layout = Layout(dp_shard=2, balanced_tables=True, engram_sparse=True)
    with pytest.raises(RecipeError, match=r"optim.embedding_update.*engram_update=dense"):
        check_runnable(inv, layout, WORK)


def test_muon_under_fsdp_x_tp_owns_every_matrix_among_all_four_ranks():
    """fsdp=2 x tp=2: each matrix tp splits has its owner among the 4 ranks of dp_shard x tp:
    row-parallel matrices (wo, w_down, which FSDP shards plainly) and column-parallel ones
    (strided) alike; each rank sends a quarter of each and receives a quarter back (the mean
    over owners), and runs a quarter of their Newton-Schulz iterations."""
    inv = build_inventory(DENSE)
    muon = estimate(inv, Layout(dp_shard=2, tp=2, muon=True), WORK, CLUSTER)
    d = C // H
    matrices = L * (2 * C * C + 2 * KV * d * C + 3 * C * F)  # q, k, v, o; gate, up, down
    assert muon.comm_gib["muon_dp_tp_all_to_all"] * GIB == pytest.approx(2 * 4 * matrices / 4)
    assert muon.comm_gib["muon_all_to_all"] == muon.comm_gib["muon_tp_all_to_all"] == 0
    tp_alone = estimate(inv, Layout(tp=2, muon=True), WORK, CLUSTER)
    assert tp_alone.comm_gib["muon_tp_all_to_all"] * GIB == pytest.approx(2 * 4 * matrices / 2)


@pytest.mark.parametrize(
    ("name", "embedding_update"), [("adamw", "adamw"), ("muon_v4", "sinkhorn")]
)
def test_the_snapshot_the_plan_predicts_is_the_one_taken(name, embedding_update):
    """One process, a model with mHC, MoE and Engram after one optimizer step: the plan's
    host bytes for one snapshot against take_snapshot's own count (within 1%: the per-tensor
    step counters are not in the plan)."""
    cfg = small_model(
        vocab_size=64,
        max_seq_len=16,
        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=8, first_k_dense=1),
        engram=EngramConfig(layers=[1], table_size=50),
    )
    model = build_model(cfg, "reference", seed=1)
    optim = OptimConfig(name=name, embedding_update=embedding_update)
    optimizer, _ = build_optimizer(model, optim, total_steps=10)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()
    measured = take_snapshot(1, [model], [optimizer]).nbytes
    layout = Layout(muon=name == "muon_v4", balanced_tables=embedding_update == "sinkhorn",
                    host_snapshots=1)  # fmt: skip
    inv = build_inventory(cfg)
    predicted = estimate(inv, layout, WORK, CLUSTER).memory_gib["host"] * GIB
    assert predicted == pytest.approx(measured, rel=0.01)


def test_the_plan_gives_each_muon_matrix_the_owner_group_the_trainer_does():
    """fsdp=4 x tp=2 on 8 ranks, rank 0's share built by the trainer's own code on the meta
    device behind a fake process group (as `--dry-run` builds it): for every matrix Muon
    trains, the plan's owner group is the one parallel/muon_exchange.py derives from the
    DTensor placements: the 8 ranks of dp_shard x tp for a matrix tp splits, dp_shard's 4
    for one it does not, and none (every rank computes them) for the FFN's column-parallel
    ones, whose 36 rows split unevenly over 8 (FSDP's strided shard of them, which FSDP2 and
    DTensor cut differently); and the plan's all-to-alls carry 2 x 4 bytes per element over
    the group."""
    overrides = [*SMALL_OVERRIDES, "model=tiny_gqa", "model.ffn_hidden_size=36",
                 "model.moe.num_experts=0", "parallel.tp=2", "launch.nproc_per_node=8",
                 "optim=muon_v4", "train.micro_batch_size=2"]  # fmt: skip
    recipe = typed_recipe(compose_recipe(overrides))
    groups = {}
    with rank_share(recipe, 0) as (share, _):
        for part in share.parts:
            for name, param in part.named_parameters():
                groups[clean_name(name)] = owner_group_size(param) if _owned(param) else 1
    inv = build_inventory(recipe.model)
    layout = layout_of(recipe.parallel, recipe.train.micro_batch_size, 8,
                       recipe.optim.engram_update, recipe.optim.name)  # fmt: skip
    assert (layout.dp_shard, layout.tp, layout.muon) == (4, 2, True)
    checked = {}
    for t in inv.params:
        if t.matrices and not t.expert:
            checked[t.name] = muon_owner_group(layout, t)
            assert checked[t.name] == groups[t.name], t.name
    ffn = [n for n in checked if ".ffn.w_gate" in n or ".ffn.w_up" in n]
    assert ffn and all(checked[n] == 1 for n in ffn)
    assert {4, 8} <= set(checked.values())
    comm = communication(inv, layout, Workload(global_batch=8, seq_len=64))
    for name, group in (("muon_dp_tp_all_to_all", 8), ("muon_all_to_all", 4)):
        numel = sum(t.numel for t in inv.params if checked.get(t.name) == group)
        assert comm[name] == pytest.approx(2 * 4 * numel / group), name


def test_muon_s_step_holds_four_buckets_of_what_a_rank_orthogonalises(monkeypatch):
    """fsdp=8: an owner's share of the matrices (an eighth of them, float32) while it fits a
    bucket, then the bucket, or a matrix larger than the bucket alone
    (parallel/muon_exchange.py's buckets: whole matrices, at least one per bucket); one
    process: all of them, the same way; four times that (the Nesterov inputs, the batch, the
    iterate, the updates)."""
    from birkhoff.parallel.planning import muon as muon_plan

    inv = build_inventory(DENSE)
    d = C // H
    shapes = [(C, C), (KV * d, C), (KV * d, C), (C, C), (F, C), (F, C), (C, F)]
    every = 4 * L * sum(r * c for r, c in shapes)
    largest = 4 * max(r * c for r, c in shapes)
    keys = set(range(-1, L + 2))  # every layer key
    for layout, held in ((Layout(dp_shard=8, muon=True), every / 8), (Layout(muon=True), every)):
        assert largest < 1.5 * largest < held
        cases = ((10 * held, held), (1.5 * largest, 1.5 * largest), (1.0, largest))
        for bucket, expected in cases:
            monkeypatch.setattr(muon_plan, "BUCKET_BYTES", bucket)
            assert muon_plan.muon_step_bytes(inv, layout, keys) == pytest.approx(4 * expected)
    assert muon_plan.muon_step_bytes(inv, Layout(dp_shard=8), keys) == 0
