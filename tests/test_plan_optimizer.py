"""`birkhoff plan`'s optimizer state for V4.1's Sinkhorn-balanced table update and the spike
guard's host snapshots: against the formula written out, and against the bytes a snapshot of
a real model and optimizer holds (train/snapshot.py)."""

from __future__ import annotations

import pytest
import torch
from test_plan import CLUSTER, DENSE, KV, C, F, H, L, V, dense_parameters

from birkhoff.model import build_model
from birkhoff.model.config import EngramConfig, MoEConfig
from birkhoff.parallel.planning.estimate import GIB, estimate
from birkhoff.parallel.planning.inventory import build_inventory
from birkhoff.parallel.planning.layout import Layout, Workload
from birkhoff.parallel.planning.search import check_runnable
from birkhoff.train.config import OptimConfig
from birkhoff.train.optim import build_optimizer
from birkhoff.train.snapshot import take_snapshot
from conftest import small_model

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


def test_muon_under_fsdp_x_tp_scatters_every_matrix_along_dp_shard():
    """fsdp=2 x tp=2: each matrix's owner along dp_shard scatters it, each rank receiving
    half, of every tp slice, and keeping its own tp slice's: row-parallel matrices (wo,
    w_down, which FSDP shards plainly) and column-parallel ones (strided) alike."""
    inv = build_inventory(DENSE)
    muon = estimate(inv, Layout(dp_shard=2, tp=2, muon=True), WORK, CLUSTER)
    d = C // H
    matrices = L * (2 * C * C + 2 * KV * d * C + 3 * C * F)  # q, k, v, o; gate, up, down
    assert muon.comm_gib["muon_scatter"] * GIB == pytest.approx(4 * matrices / 2)


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
