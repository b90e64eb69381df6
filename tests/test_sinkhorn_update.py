"""V4.1's Sinkhorn-balanced update: against the algorithm written out element by element in
float64, sharded tables against one process, the parameter groups, and a training run."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_resilience import free_port
from test_spikes import trainer_of

from birkhoff.errors import RecipeError
from birkhoff.launch.recipe import load_recipe
from birkhoff.model import build_model
from birkhoff.parallel import distributed
from birkhoff.train.optim import build_optimizer
from birkhoff.train.sinkhorn_update import sinkhorn_balanced, sinkhorn_step
from conftest import compose_recipe, small_model


def written_out(g: list[list[float]], iterations=11, tau=1e-3, eps=1e-20) -> list[list[float]]:
    """Alg. 1's balancing with Python floats: zero quiet rows, then rows and columns in turn."""
    rows, cols = len(g), len(g[0])
    norms = [math.sqrt(sum(v * v for v in row)) for row in g]
    mean = sum(norms) / rows
    x = [[0.0] * cols if norms[i] <= tau * mean else list(g[i]) for i in range(rows)]
    for k in range(1, iterations + 1):
        if k % 2:
            for i in range(rows):
                n = math.sqrt(sum(v * v for v in x[i]))
                x[i] = [v / (n + eps) for v in x[i]]
        else:
            for j in range(cols):
                n = math.sqrt(sum(x[i][j] ** 2 for i in range(rows)))
                for i in range(rows):
                    x[i][j] /= n + eps
    return x


def test_balancing_is_the_algorithm_written_out():
    g = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g[2] *= 1e-5  # a quiet row (a token not in the batch): zeroed
    g[4] *= 30.0  # a loud one: balanced against the others, not dominating
    expected = torch.tensor(written_out(g.tolist()), dtype=torch.float64)
    got = sinkhorn_balanced(g).double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert got[2].abs().max() == 0


def test_two_steps_are_the_update_written_out():
    """EMA momentum, Nesterov, sqrt(n) * gamma scale and the learning rate, over two steps."""
    torch.manual_seed(1)
    weight = torch.randn(6, 4, dtype=torch.float64)
    param = torch.nn.Parameter(weight.clone())
    group = {"lr": 0.01, "momentum": 0.9, "update_rms": 0.18}
    state, expected, momentum = {}, weight.clone(), torch.zeros_like(weight)
    for _ in range(2):
        grad = torch.randn(6, 4, dtype=torch.float64)
        param.grad = grad.clone()
        sinkhorn_step(param, state, group)
        momentum = 0.9 * momentum + 0.1 * grad
        nesterov = 0.9 * momentum + 0.1 * grad
        balanced = torch.tensor(written_out(nesterov.tolist()), dtype=torch.float64)
        expected -= 0.01 * 0.18 * math.sqrt(4) * balanced
    assert torch.allclose(param.detach(), expected, rtol=1e-5, atol=1e-8)
    assert state["step"].item() == 2


def _sharded_rank(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(3)  # the same full tensors on both ranks
    weight, grad = torch.randn(9, 4), torch.randn(9, 4)
    whole = torch.nn.Parameter(weight.clone())
    whole.grad = grad.clone()
    sharded = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, [Shard(0)]))
    sharded.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
    group = {"lr": 0.1, "momentum": 0.95, "update_rms": 0.18}
    sinkhorn_step(whole, {}, group)
    sinkhorn_step(sharded, {}, group)
    saved = {"before": weight, "whole": whole.detach(), "mine": sharded.to_local().detach()}
    torch.save(saved, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_a_row_sharded_table_gets_its_slice_of_the_one_process_update(tmp_path: Path):
    """Column norms span every row: two ranks holding 5 and 4 rows apply exactly the rows
    of the update one process computes on the whole table."""
    mp.spawn(_sharded_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    saved = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    whole = saved[0]["whole"]
    assert torch.equal(torch.cat([s["mine"] for s in saved]), whole)
    assert not torch.equal(whole, saved[0]["before"])  # it moved


def test_the_tables_form_sinkhorn_groups_and_the_rest_is_unchanged():
    model = build_model(small_model(tie_embeddings=False), "reference")
    overrides = ["optim=muon_v4", "optim.embedding_update=sinkhorn"]
    recipe, _ = load_recipe(compose_recipe(overrides), env={})
    optimizer, _ = build_optimizer(model, recipe.optim, 10)
    groups = {g["name"]: g for g in optimizer.param_groups}
    balanced = {id(p) for g in groups.values() if g.get("sinkhorn") for p in g["params"]}
    assert balanced == {id(model.embedding.weight), id(model.head.weight)}
    assert all(g["weight_decay"] == 0 for g in groups.values() if g.get("sinkhorn"))
    assert "muon" in groups and not balanced & {id(p) for p in groups["muon"]["params"]}


def test_it_refuses_sparse_engram_updates():
    with pytest.raises(RecipeError, match=r"optim.embedding_update.*engram_update=dense"):
        load_recipe(
            compose_recipe(["optim.embedding_update=sinkhorn", "optim.engram_update=sparse"]),
            env={},
        )


def test_a_training_run_moves_the_head_by_rms_lr_times_gamma():
    """Every vocabulary row of the head has a gradient (the softmax spans them all): none is
    zeroed, so each step moves the head by RMS exactly lr * 0.18; the loss falls."""
    overrides = ["train.steps=8", "train.eval_every=0", "optim.embedding_update=sinkhorn",
                 "model.tie_embeddings=false"]  # fmt: skip
    with distributed(torch.device("cpu"), {}) as ctx:
        trainer = trainer_of(overrides, ctx)
        records = []
        for _ in range(8):
            before = trainer.model.head.weight.detach().clone()
            records.append(trainer.train_step())
            moved = (trainer.model.head.weight.detach() - before).pow(2).mean().sqrt()
            assert moved.item() == pytest.approx(records[-1]["lr"] * 0.18, rel=1e-4)
    assert records[-1]["loss"] < records[0]["loss"] - 0.2
