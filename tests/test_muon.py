"""optim=muon_v4 (train/muon.py): the hybrid Newton-Schulz against the SVD's polar factor, the
optimizer against V4's update written out and against torch.optim.Muon where they agree, and
which parameters Muon trains. Layouts against one process: tests/test_parallel.py."""

from __future__ import annotations

import math

import pytest
import torch

from birkhoff.model import build_model
from birkhoff.parallel.comm_counter import CollectiveBytes
from birkhoff.train.config import OptimConfig
from birkhoff.train.muon import QUINTIC, MuonV4, hybrid_newton_schulz
from birkhoff.train.optim import build_optimizer
from conftest import compose_recipe


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """U V^T of the SVD, in float64: the orthogonal matrix nearest to `matrix`."""
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (3, 24, 40)])
def test_hybrid_newton_schulz_reaches_the_polar_factor(shape):
    """8 quintic iterations leave the singular values spread around 1; V4's 2 cubic ones pull
    them in: every singular value within 5% of 1, the matrix within 5% of U V^T (the quintic
    alone: up to ~30% off)."""
    torch.manual_seed(0)
    matrix = torch.randn(shape)
    got = hybrid_newton_schulz(matrix)
    assert got.shape == matrix.shape and got.dtype == torch.float32
    singular = torch.linalg.svdvals(got.double())
    assert (singular - 1).abs().max() < 0.05
    expected = polar(matrix)
    error = torch.linalg.matrix_norm(got.double() - expected) / torch.linalg.matrix_norm(expected)
    assert error.max() < 0.05
    quintic_only = hybrid_newton_schulz(matrix, ((QUINTIC, 10),))
    assert (torch.linalg.svdvals(quintic_only.double()) - 1).abs().max() > 0.1


@pytest.mark.parametrize("shape", [(5, 40, 24), (3, 24, 40), (2, 2, 16, 48)])
def test_batched_run_is_the_iteration_written_out(shape):
    """The batched run (three products an iteration, the polynomial regrouped) against V4's
    iteration as it reads, X <- a X + (b A + c A^2) X with A = X X^T, each matrix on its own
    in float64: the same polynomial, so equal to float32 rounding."""
    torch.manual_seed(0)
    stack = torch.randn(shape)
    got = hybrid_newton_schulz(stack)
    flat = stack.double().reshape(-1, *shape[-2:])
    for index, matrix in enumerate(flat):
        x = matrix.T if matrix.shape[0] > matrix.shape[1] else matrix
        x = x / torch.linalg.matrix_norm(x)
        for a, b, c in [QUINTIC] * 8 + [(2.0, -1.5, 0.5)] * 2:
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        expected = x.T if matrix.shape[0] > matrix.shape[1] else x
        assert torch.allclose(got.reshape(flat.shape)[index].double(), expected, atol=2e-6)


def run(optimizer: torch.optim.Optimizer, param: torch.Tensor, grads: list[torch.Tensor]):
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        optimizer.zero_grad()


def test_update_is_v4s_formula():
    """Three steps against M_t = mu M + G, O = NS(mu M_t + G) sqrt(max(n, m)) gamma,
    W <- W (1 - lr wd) - lr O, written out here; a batch of expert matrices each as its own."""
    torch.manual_seed(0)
    start = torch.randn(4, 12, 20)
    grads = [torch.randn(4, 12, 20) for _ in range(3)]
    lr, wd, mu, gamma = 0.02, 0.1, 0.95, 0.18
    param = torch.nn.Parameter(start.clone())
    group = {"params": [param], "muon": True, "momentum": mu, "update_rms": gamma}
    run(MuonV4([group], lr=lr, weight_decay=wd), param, grads)
    for expert in range(4):
        weight, momentum = start[expert].clone(), torch.zeros(12, 20)
        for grad in grads:
            momentum = mu * momentum + grad[expert]
            update = hybrid_newton_schulz(mu * momentum + grad[expert]) * math.sqrt(20) * gamma
            weight = weight * (1 - lr * wd) - lr * update
        torch.testing.assert_close(param[expert], weight, rtol=1e-5, atol=1e-6)
    rms = (param.detach() - start * (1 - lr * wd) ** 3).pow(2).mean().sqrt() / lr
    assert 0.3 < rms < 3 * gamma  # three updates of RMS ~0.18 each


def test_matrices_of_one_shape_share_a_run_and_each_gets_its_own_update():
    """Three steps of 6 parameters in 3 shapes up to a transpose (a 12 x 20, its 20 x 12
    transpose and a stack of 2 experts of 12 x 20; two 8 x 8; a 5 x 9): 3 Newton-Schulz runs
    a step, and every matrix's update that of hybrid_newton_schulz on it alone (V4's formula
    written out per matrix)."""
    torch.manual_seed(1)
    shapes = [(12, 20), (8, 8), (20, 12), (2, 12, 20), (5, 9), (8, 8)]
    starts = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    lr, wd, mu, gamma = 0.02, 0.1, 0.95, 0.18
    params = [torch.nn.Parameter(s.clone()) for s in starts]
    group = {"params": params, "muon": True, "momentum": mu, "update_rms": gamma}
    optimizer = MuonV4([group], lr=lr, weight_decay=wd)
    runs = []
    orthogonalise = optimizer.orthogonalise
    optimizer.orthogonalise = lambda m, rms: runs.append(m.shape) or orthogonalise(m, rms)
    for step_grads in grads:
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
    # one run per shape: the 12 x 20 ones (4 matrices, wide), the two 8 x 8, the 5 x 9
    assert sorted(runs[:3]) == sorted([(4, 12, 20), (2, 8, 8), (5, 9)]) and len(runs) == 9
    for start, param, shape, i in zip(starts, params, shapes, range(6), strict=True):
        weight, momentum = start.clone(), torch.zeros(shape)
        for step_grads in grads:
            momentum = mu * momentum + step_grads[i]
            nesterov = mu * momentum + step_grads[i]
            update = hybrid_newton_schulz(nesterov) * math.sqrt(max(shape[-2:])) * gamma
            weight = weight * (1 - lr * wd) - lr * update
        torch.testing.assert_close(param.detach(), weight, rtol=1e-5, atol=1e-6)


def test_agrees_with_torchs_muon_where_their_definitions_meet():
    """torch.optim.Muon (EMA momentum, one coefficient set, bfloat16 iterations) against
    MuonV4 run with that coefficient set for all 10 iterations and torch's 0.2 RMS: the
    momentum's (1 - mu) factor vanishes in the normalisation; bfloat16 leaves ~1% apart."""
    torch.manual_seed(1)
    start = torch.randn(48, 32)
    grads = [torch.randn(48, 32) for _ in range(4)]
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    group = {"params": [ours], "muon": True, "momentum": 0.95, "update_rms": 0.2}
    run(MuonV4([group], schedule=((QUINTIC, 10),), lr=0.01, weight_decay=0.1), ours, grads)
    reference = torch.optim.Muon(
        [theirs], lr=0.01, weight_decay=0.1, ns_steps=10, adjust_lr_fn="match_rms_adamw"
    )
    run(reference, theirs, grads)
    moved_ours, moved_theirs = (ours - start).detach(), (theirs - start).detach()
    error = torch.linalg.matrix_norm(moved_ours - moved_theirs) / torch.linalg.matrix_norm(
        moved_theirs
    )
    assert error < 0.03


def test_muon_trains_the_matrices_and_adamw_the_rest():
    recipe = compose_recipe(["optim=muon_v4", "model.mtp.depth=1"])
    from birkhoff.launch.recipe import load_recipe

    typed, _ = load_recipe(recipe, env={})
    model = build_model(typed.model)
    optimizer, _ = build_optimizer(model, typed.optim, 100)
    assert isinstance(optimizer, MuonV4)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    muon = groups["muon"]
    assert "blocks.0.attention.w_q_down.weight" in muon
    assert "blocks.0.ffn.experts.w_gate" in muon and "blocks.0.ffn.router.weight" in muon
    assert "blocks.1.engram.key.weight" in muon and "mtp.0.hidden_proj.weight" in muon
    assert "blocks.0.attention_residual.proj.weight" in muon  # mHC's dynamic projection
    adamw = set().union(*(v for k, v in groups.items() if k != "muon"))
    for name in (
        "embedding.weight",
        "head.weight",
        "norm.weight",
        "blocks.0.attention_residual.bias_res",
        "blocks.0.attention_residual.alpha",
        "blocks.1.engram.table.weight",
        "blocks.1.engram.conv_weight",
        "blocks.0.attention.sinks",
    ):
        assert name in adamw, name
    assert not muon & adamw
    assert muon | adamw == set(names.values())
    assert all(model.get_parameter(n).dim() >= 2 for n in muon)


def test_bad_muon_settings_fail_naming_the_key():
    from birkhoff.errors import RecipeError

    for key, value in (("muon_momentum", 1.0), ("muon_update_rms", 0.0), ("name", "sgd")):
        with pytest.raises(RecipeError, match=f"optim.{key}"):
            OptimConfig(**{key: value}).validate()


# layout: (mesh shape, dim names, placements, matrices each rank orthogonalises in 2 steps).
# One process: 1 + 1 + 4 (two matrices, a stack of 4 experts) per step, 12 in all. Owners
# round-robin by size over the ranks that shard a matrix (parallel/muon_exchange.py).
MESHES = {
    # the larger matrix by shard rank 0, the other by shard rank 1, 2 experts each where
    # they lie: 3 a step each
    "1-D mesh": ((2,), None, ("Shard(0)",), [6, 6]),
    # 9 and 11 rows in 2: shards of 5 and 4, 6 and 5 rows
    "1-D mesh, uneven": ((2,), None, ("Shard(0)",), [6, 6]),
    # tp alone, columns split: the expert stack is assembled too (along its dim 1); owners by
    # size (the stack, the 20 x 6, the 12 x 8: ranks 0, 1, 0): 4 + 1 and 1 a step
    "1-D mesh, columns": ((2,), None, ("Shard(1)",), [10, 2]),
    # a strided shard alone (rows in 2 x 2 interleaved pieces): each shard put back at the
    # rows DTensor's strided split gives its rank; experts lie whole
    "1-D mesh, strided": ((2,), None, ("StridedShard(0)",), [6, 6]),
    "FSDP's 1 x 2 mesh": ((1, 2), ("dp_replicate", "dp_shard"), ("Replicate", "Shard(0)"),
                          [6, 6]),
    # each replica has its owners: the same work on both
    "HSDP's 2 x 2 mesh": ((2, 2), ("dp_replicate", "dp_shard"), ("Replicate", "Shard(0)"),
                          [6] * 4),
    # rows over dp_shard, columns over tp: owners among all 4 ranks by size (the stack of 240
    # elements, the 20 x 6, the 12 x 8: ranks 0, 1, 2), rank 3 owns none
    "fsdp x tp 2 x 2 mesh": ((2, 2), ("dp_shard", "tp"), ("Shard(0)", "Shard(1)"),
                             [8, 2, 2, 0]),
    # column-parallel under fsdp x tp: FSDP's strided shard of tp's rows; the experts lie
    # whole (dim 0), one per rank; the 20 x 6 owned by rank 0, the 12 x 8 by rank 1
    "fsdp x tp 2 x 2 mesh, column-parallel": ((2, 2), ("dp_shard", "tp"),
                                              ("StridedShard(0)", "Shard(0)"), [4, 4, 2, 2]),
    # 9 and 11 rows do not split evenly in 4: FSDP2 cuts such a strided shard per tp rank,
    # DTensor's split otherwise, so no owner assembles them: every rank computes both, 3 a
    # step with its expert
    "fsdp x tp 2 x 2 mesh, column-parallel, uneven": ((2, 2), ("dp_shard", "tp"),
                                                      ("StridedShard(0)", "Shard(0)"),
                                                      [6, 6, 6, 6]),
}  # fmt: skip
SHAPES = [(12, 8), (20, 6), (4, 6, 10)]  # two matrices and a stack of 4 experts
UNEVEN = [(9, 8), (11, 6), (4, 6, 10)]


def _owner_rank(rank: int, world: int, port: int, out: str, layout: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shape, names, kinds, _ = MESHES[layout]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    placements = [
        Replicate() if kind == "Replicate"
        else _StridedShard(int(kind[-2]), split_factor=shape[-1]) if kind.startswith("Strided")
        else Shard(int(kind[6]))
        for kind in kinds
    ]  # fmt: skip
    torch.manual_seed(5)  # the same full tensors on every rank
    shapes = UNEVEN if layout.endswith("uneven") else SHAPES
    weights = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(2)]
    results = {}
    # one process; sharded, one bucket per step; sharded, a bucket per matrix
    for sharded, bucket_bytes in ((False, None), (True, 2**20), (True, 1)):
        # every rank has the full tensors: each cuts its own shard
        place = (
            (lambda t: distribute_tensor(t, mesh, placements, src_data_rank=None))
            if sharded
            else (lambda t: t)
        )
        params = [torch.nn.Parameter(place(w.clone())) for w in weights]
        group = {"params": params, "muon": True, "momentum": 0.95, "update_rms": 0.18,
                 "weight_decay": 0.1}  # fmt: skip
        optimizer = MuonV4([group], lr=0.02, bucket_bytes=bucket_bytes or 1)
        with CollectiveBytes({}) as counted:
            for step_grads in grads:
                for param, grad in zip(params, step_grads, strict=True):
                    param.grad = place(grad)
                optimizer.step()
        key = (sharded, bucket_bytes)
        results[key] = [p.to_local() if sharded else p for p in params]
        results[f"work {key}"] = optimizer.orthogonalised
        calls = counted.calls.items()
        results[f"all-to-alls {key}"] = sum(n for k, n in calls if k[0] == "all_to_all")
        results[f"other collectives {key}"] = sum(n for k, n in calls if k[0] != "all_to_all")
    # this rank's slices of the one-process result, cut by DTensor itself (no communication)
    results["expected"] = [
        distribute_tensor(p.detach(), mesh, placements, src_data_rank=None).to_local()
        for p in results[(False, None)]
    ]
    torch.save(results, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("layout", list(MESHES))
def test_owner_ranks_share_the_work_and_give_one_process_update(tmp_path, layout):
    """Each sharded matrix is orthogonalised by one owner among the ranks that shard it
    (HSDP's replicas each have theirs) and the experts where they lie; every rank's shards
    equal its slices of the update one process computes, with the owners' matrices sent in
    one bucket a step (2 all-to-alls) or a bucket per matrix, and no other collective."""
    import torch.multiprocessing as mp
    from test_resilience import free_port

    world = math.prod(MESHES[layout][0])
    mp.spawn(_owner_rank, args=(world, free_port(), str(tmp_path), layout), nprocs=world)
    saved = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]
    for s in saved:
        for bucketed in ((True, 2**20), (True, 1)):
            for got, expected in zip(s[bucketed], s["expected"], strict=True):
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert [s["work (False, None)"] for s in saved] == [12] * world
    assert [s["work (True, 1048576)"] for s in saved] == MESHES[layout][3]
    assert [s["work (True, 1)"] for s in saved] == MESHES[layout][3]
    # the expert stack is assembled where tp splits its columns: 3 matrices owned, else 2;
    # none of the uneven strided ones (each rank gathers them whole instead)
    owned = 3 if layout in ("1-D mesh, columns", "fsdp x tp 2 x 2 mesh") else 2
    owned = 0 if layout.endswith("column-parallel, uneven") else owned
    steps = 2
    assert [s["all-to-alls (True, 1048576)"] for s in saved] == [2 * steps * min(owned, 1)] * world
    assert [s["all-to-alls (True, 1)"] for s in saved] == [2 * steps * owned] * world
    others = [s[f"other collectives {k}"] for s in saved for k in ((True, 2**20), (True, 1))]
    assert all(n > 0 for n in others) if owned == 0 else all(n == 0 for n in others)
