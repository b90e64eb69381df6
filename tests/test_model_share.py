"""A rank's share of the model (train/model_share.py): built on the meta device, cut and
sharded there, then materialised. Measured in separate processes (torchrun, gloo) against
one process: what a rank holds and how far its resident set grows while building, whether
the parameters are those one process draws, and `train.init_from` read into the shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import train_in_process

from birkhoff.checkpoint.contents import read_tensors
from birkhoff.checkpoint.export import export_safetensors
from birkhoff.parallel.memory import reset_peak_memory
from birkhoff.train.init_from import MODEL_PREFIX
from conftest import SMALL_OVERRIDES
from share_worker import build_and_measure, digest

TESTS = Path(__file__).parent
# 94M parameters (377 MB in float32), so that the model, not the interpreter, is what grows.
LARGE = [
    "model=tiny_dense",
    "model.hidden_size=768",
    "model.num_layers=8",
    "model.ffn_hidden_size=4096",
    "model.mtp.depth=0",
    "launch.nproc_per_node=2",
]
SHARDED = {"fsdp=2": ["parallel.dp_shard=2"], "pp=2": ["parallel.pp=2"]}


@pytest.fixture(scope="module")
def measured(tmp_path_factory, shakespeare_shards) -> tuple[dict, dict, dict[str, Path]]:
    """(one process's measurements, {job: [rank measurements]}, the init_from sources)."""
    if not reset_peak_memory(torch.device("cpu")):
        pytest.skip("this kernel does not let a process reset its resident-set peak (clear_refs)")
    work = tmp_path_factory.mktemp("share")
    run = work / "run"
    train_in_process(
        run, ["train.steps=1", "optim.warmup_steps=0", "checkpoint.every=1", shakespeare_shards]
    )
    checkpoint = run / "checkpoints" / "step-00000001"
    sources = {"checkpoint": checkpoint, "export": export_safetensors(checkpoint)}
    small = [*SMALL_OVERRIDES, "launch.nproc_per_node=2", "train.micro_batch_size=4"]
    jobs = {name: [*LARGE, *extra] for name, extra in SHARDED.items()}
    jobs["fsdp=2 from checkpoint"] = [*small, "parallel.dp_shard=2"]
    jobs["tp=2 from export"] = [*small, "parallel.tp=2"]
    jobs["fsdp=2 from checkpoint"].append(f"train.init_from={checkpoint}")
    jobs["tp=2 from export"].append(f"train.init_from={sources['export']}")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        str(TESTS / "share_worker.py"), str(work), json.dumps(jobs),
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = {
        name: [json.loads(p.read_text()) for p in sorted((work / name).glob("rank*.json"))]
        for name in jobs
    }
    one = build_and_measure([*LARGE[:-1], "launch.nproc_per_node=1"])
    return one, ranks, sources


def whole_digests(ranks: list[dict]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for rank in ranks:
        for name, value in rank["digests"].items():
            assert merged.setdefault(name, value) == value, f"ranks disagree on {name}"
    return merged


@pytest.mark.parametrize("layout", list(SHARDED))
def test_a_rank_builds_and_holds_about_half(measured, layout):
    """Measured: one process grows its resident set by 369 MiB while building and holds
    360 MiB of parameters; rank 0 grows by 201 MiB with fsdp=2 and by 194 MiB with pp=2 (the
    embedding and 4 of the 8 layers), holding 180 MiB. Built on the CPU instead of meta (as
    before), both layouts grow by the whole model and fail here. The allocator's peak while
    building (mem_peak_mib's other instrument) halves too."""
    one, ranks, _ = measured
    rank0 = ranks[layout][0]
    params_ratio = rank0["held"]["params"] / one["held"]["params"]
    growth_ratio = rank0["peak_growth_mib"] / one["peak_growth_mib"]
    allocated_ratio = rank0["allocated_peak_mib"] / one["allocated_peak_mib"]

    assert 0.45 < params_ratio < 0.55, params_ratio
    assert 0.4 < growth_ratio < 0.6, (growth_ratio, rank0["peak_growth_mib"], one)
    assert 0.4 < allocated_ratio < 0.6, (allocated_ratio, rank0["allocated_peak_mib"])


@pytest.mark.parametrize("layout", list(SHARDED))
def test_every_layout_draws_the_parameters_of_one_process(measured, layout):
    one, ranks, _ = measured
    assert whole_digests(ranks[layout]) == one["digests"]


@pytest.mark.parametrize(
    ("job", "source"), [("fsdp=2 from checkpoint", "checkpoint"), ("tp=2 from export", "export")]
)
def test_init_from_reads_into_the_shards(measured, job, source):
    """Each rank reads its elements of the trained checkpoint (DCP) or its export
    (safetensors); gathered, they are the checkpoint's tensors as one process reads them."""
    _, ranks, sources = measured
    got = whole_digests(ranks[job])
    names = [MODEL_PREFIX + name for name in got]
    saved = read_tensors(sources["checkpoint"], names)
    expected = {name.removeprefix(MODEL_PREFIX): digest(t) for name, t in saved.items()}
    assert got == expected
    fresh = build_and_measure([*SMALL_OVERRIDES, "launch.nproc_per_node=1"])["digests"]
    assert sum(fresh[name] != value for name, value in got.items()) > len(got) // 2


def test_initial_values_follow_the_stated_distribution():
    """Matrices Normal(0, init_std), output projections Normal(0, init_std / sqrt(2 x layers)),
    norm gains 1 and mHC's H_res bias its identity logits (written out here)."""
    from birkhoff.model import build_model
    from conftest import small_model

    cfg = small_model(hidden_size=256, ffn_hidden_size=1024, num_layers=4, init_std=0.05)
    params = dict(build_model(cfg, seed=7).named_parameters())
    expected = {"blocks.1.ffn.w_up.weight": 0.05, "blocks.1.ffn.w_down.weight": 0.05 / 8**0.5}
    for name, std in expected.items():
        values = params[name].detach().double()
        assert abs(values.mean().item()) < 3 * std / values.numel() ** 0.5, name
        assert values.std().item() == pytest.approx(std, rel=0.01), name
    assert params["blocks.2.ffn_norm.weight"].eq(1).all()
    n, logit = cfg.residual.n_streams, cfg.residual.res_init_logit
    expected = torch.full((n, n), 0.0) + torch.eye(n) * logit
    torch.testing.assert_close(params["blocks.0.ffn_residual.bias_res"].detach(), expected)


def test_tied_embeddings_stay_tied_after_the_meta_build():
    """`to_empty` gives each module its own tensor: the head must be re-tied to the embedding
    (FSDP keeps the tie itself; one process, DDP and tp do not)."""
    from birkhoff.launch.recipe import load_recipe, recipe_to_dict
    from birkhoff.parallel.distributed import DistributedContext
    from birkhoff.train.entry import train_recipe_from_dict
    from birkhoff.train.model_share import build_share
    from conftest import compose_recipe

    overrides = [*SMALL_OVERRIDES, "model.tie_embeddings=true"]
    recipe = train_recipe_from_dict(recipe_to_dict(load_recipe(compose_recipe(overrides), {})[0]))
    ctx = DistributedContext(0, 0, 1, None, recipe.parallel.degrees(1), torch.device("cpu"))
    (model,) = build_share(recipe, ctx, torch.device("cpu"), None, 0, 1).parts
    assert model.head.weight is model.embedding.weight
