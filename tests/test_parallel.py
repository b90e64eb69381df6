"""Parallel layouts against one process: loss and gradients of `tiny` (V4 attention in every
layer type, mHC, hash-routed and top-k MoE, Engram, MTP; 4 layers) after 3 steps on gloo
ranks, and of `tiny_gqa` (grouped-query attention) in the layouts that split its heads; the
layouts of one world size share a torchrun of parallel_worker.py.

Tolerances (gradient errors are global relative L2 errors over all parameters):
- Step 1, same weights: only float32 summation order differs (split matmuls under tp,
  sharded reductions). Measured on the V4 tiny: 0 for dp, fsdp and pp, 3e-9 with ep, 1.2e-7
  with Engram rows sharded. With tp it depends on the draw: 1.1e-5, 9.5e-6 and 4.2e-6 for
  train.seed 0, 1 and 2 (the previous init gave 4.8e-7 and 7.6e-6 for seeds 0 and 1; with
  index_topk above the number of entries, so no indexer selection, 2.8e-5: not a top-k tie).
  Allowed: 1e-5 without tp, 1e-4 with tp, so a missing reduction or a wrong divide factor
  (errors of order 1) cannot pass.
- Step 3: the ~1e-7 differences in the clipping norm and gradients reach the weights, and
  Adam's first steps divide each element by its own magnitude, so elements whose gradient is
  noise-level (rarely hit Engram rows, cancelling mHC biases) take lr-sized different steps,
  and a token whose top-k experts were nearly tied may switch. Measured: 0 for DDP, fsdp and
  pp (1F1B), 1e-3 for most sharded layouts, up to 7.5e-3 with tp. Allowed: 5e-2. Losses
  (about 10.8: language model, MTP and indexer losses) within 2e-3 absolute on every step
  (measured: <= 2e-6 without tp, up to 3.4e-4 with tp on the V4 tiny).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from birkhoff.launch.plan_command import workload_of
from birkhoff.launch.recipe import typed_recipe
from birkhoff.parallel.planning.cluster import Cluster
from birkhoff.parallel.planning.communication import communication
from birkhoff.parallel.planning.estimate import GIB, estimate, rank_keys
from birkhoff.parallel.planning.inventory import build_inventory
from birkhoff.parallel.planning.layout import layout_of, stage_layers
from birkhoff.parallel.planning.muon import newton_schulz_runs
from conftest import SMALL_OVERRIDES, compose_recipe

TESTS = Path(__file__).parent
STEPS = 3
# The first test to use `results` runs every layout in its setup: three torchruns (1, 2 and 4
# ranks, each bounded by its own 900 s), 10-11 minutes alone on 2 cores and more beside other
# test workers; the suite's 600 s per test would cut it off.
pytestmark = pytest.mark.timeout(2700)
# 4 layers so that pp=2 x 2 chunks has a layer per stage, an MTP depth (on the last pipeline
# stage), the sequence-wise balance loss (added on the stage of its MoE layer) and a hash-routed
# MoE layer (layer 1; under sequence parallelism it routes its part of the token ids); global
# batch 8. V4 attention in every layer type (layer 1 also routes by hash, layer 2 has Engram),
# with windows and HCA blocks short enough that the 64-token sequences cross them, over packed
# documents (compressed blocks align with document starts).
MODEL = [
    "model.num_layers=4",
    "model.moe.hash_layers=1",
    "model.engram.layers=[1,2]",
    "model.mtp.depth=1",
    "model.moe.seq_aux_loss_coef=0.01",
    "model.attention.layer_types=[sliding,csa,hca,csa]",
    "model.attention.sliding_window=16",
    "model.attention.hca_ratio=16",
    "model.attention.index_topk=4",
    "data.document_mask=true",
    "train.eval_batches=1",
]
GQA = "model=tiny_gqa"
# Engram tables with row-sparse gradients: whole on every rank, outside DDP and FSDP, their
# gradients gathered over dp (accumulated over micro-batches, through zero bubble's split
# backward); compared with one process that updates them sparsely too.
SPARSE = "optim.engram_update=sparse"
# Muon (optim=muon_v4) on matrices sharded by FSDP and ep, and by tp: each orthogonalised
# whole, so every rank applies its slice of one process's update.
MUON = "optim=muon_v4"
# V4's AdamW eps (1e-20) makes the first update of an element lr x sign(gradient) however small
# the gradient: mHC's stream biases start with gradients at rounding level (the streams start
# equal), so layouts that differ by rounding would step them by +-lr apart. eps 1e-8 does not.
ROUNDING_EPS = "optim.eps=1e-8"
TP_SP = ["parallel.tp=2", "parallel.sequence_parallel=true"]
ROUTING = "train.anticipatory.mode=always"
MICRO_4 = "train.micro_batch_size=4"  # 1 or 2 data-parallel ranks; 4 ranks take micro-batch 2


def run_layouts(out: Path, ranks: int, layouts: dict[str, list[str]]) -> dict[str, dict]:
    """Per layout: losses and full gradients of the first and last step (merged over ranks).

    A rank killed by a signal (a native crash: once in CI, 2026-12-05, glibc's "malloc():
    unaligned tcache chunk detected" in the CPU profiler's step, never seen again in 20
    runs here) reruns the layouts without results once, with a warning holding the
    rank's Python stack; a second crash, or any failure of the code, fails."""
    layouts = {name: [*MODEL, *o, f"launch.nproc_per_node={ranks}"] for name, o in layouts.items()}
    result = _torchrun(out, ranks, layouts)
    left = {n: o for n, o in layouts.items() if len(list((out / n).glob("rank*.pt"))) < ranks}
    if result.returncode != 0 and left and _crashed(result.stderr + result.stdout):
        warnings.warn(
            f"a rank of {ranks} crashed (rerunning {len(left)} of {len(layouts)} layouts): "
            + result.stderr[-3000:],
            stacklevel=1,
        )
        result = _torchrun(out, ranks, left)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return {name: merge_ranks(out / name) for name in layouts}


def _torchrun(out: Path, ranks: int, layouts: dict[str, list[str]]):
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
        "--standalone", str(TESTS / "parallel_worker.py"), str(out), str(STEPS),
        json.dumps(layouts), json.dumps(PEAK_PLANNED),
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    # a rank that crashes prints its Python stack (faulthandler)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def _crashed(output: str) -> bool:
    """Whether torchrun reports a rank ended by SIGSEGV, SIGBUS or SIGABRT (a native crash;
    a Python error exits with 1)."""
    return any(f"exitcode  : -{int(s)} " in output for s in CRASHES)


CRASHES = (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)


def merge_ranks(out: Path) -> dict:
    merged = {"losses": None, "grad_norms": None}
    merged |= {"first_grads": {}, "grads": {}}
    merged["router_biases"] = {}
    merged["routes"] = {}  # where recorded: per router, the experts of each forward
    merged["probes"] = []  # per rank, in rank order: what its second step cost
    for path in sorted(out.glob("rank*.pt")):
        saved = torch.load(path)
        merged["probes"].append(saved["probe"])
        for key in ("losses", "grad_norms"):
            assert merged[key] in (None, saved[key]), f"ranks disagree on {key}"
            merged[key] = saved[key]
        assert not merged["routes"].keys() & saved["routes"].keys(), "a router on two ranks"
        merged["routes"] |= saved["routes"]
        for key in ("first_grads", "grads", "router_biases"):
            for name, grad in saved[key].items():
                if name in merged[key]:  # replicas must agree on a gradient they both hold
                    torch.testing.assert_close(grad, merged[key][name], rtol=0, atol=1e-6)
                merged[key][name] = grad
    return merged


def relative_error(grads: dict, reference: dict) -> float:
    assert sorted(grads) == sorted(reference), set(grads) ^ set(reference)
    diff = sum((grads[k] - reference[k]).pow(2).sum() for k in reference)
    return (diff / sum(g.pow(2).sum() for g in reference.values())).sqrt().item()


LAYOUTS = {
    "dp=2 (DDP) + sparse Engram updates": (2, ["parallel=data_parallel", SPARSE, MICRO_4]),
    "fsdp=2": (2, ["parallel.dp_shard=2", MICRO_4]),
    "tp=2": (2, ["parallel.tp=2", MICRO_4]),
    "tp=2 + sequence parallel": (2, [*TP_SP, MICRO_4]),
    # micro-batches of 2: two accumulated per rank, which the sharded rows must average right
    "fsdp=2 + Engram rows sharded": (
        2,
        ["parallel.engram_row_shard=true", "train.micro_batch_size=2"],
    ),
    # two micro-batches per rank, each reduce-scattered into the sharded gradients
    "fsdp=2 reducing every micro-batch + sparse Engram updates": (
        2,
        [
            "parallel.dp_shard=2",
            "parallel.fsdp_reduce_every_micro_batch=true",
            SPARSE,
            "train.micro_batch_size=2",
        ],
    ),
    "fsdp=2 x ep=2": (4, ["parallel.dp_shard=4", "parallel.ep=2", "train.micro_batch_size=2"]),
    "hsdp=2x2 + selective AC + Engram rows sharded": (
        4,
        [
            "parallel.dp_replicate=2",
            "parallel.dp_shard=2",
            "parallel.activation_checkpoint=selective",
            "parallel.engram_row_shard=true",
            "train.micro_batch_size=2",
        ],
    ),
    "pp=2 (1F1B)": (2, ["parallel.pp=2", MICRO_4]),
    "pp=2 x tp=2 + sequence parallel": (4, ["parallel.pp=2", *TP_SP, MICRO_4]),
    # selective checkpointing around the experts' own FSDP unit (ep), on micro-batches of 2
    "fsdp=2 x ep=2 x tp=2 + sequence parallel + selective AC": (
        4,
        [
            "parallel.dp_shard=2",
            "parallel.ep=2",
            *TP_SP,
            "parallel.activation_checkpoint=selective",
            "train.micro_batch_size=2",
        ],
    ),
    "pp=2 interleaved 1F1B x 2 chunks + full AC": (
        2,
        [
            "parallel.pp=2",
            "parallel.pp_schedule=interleaved_1f1b",
            "parallel.pp_stages_per_rank=2",
            "parallel.activation_checkpoint=full",
            "train.micro_batch_size=2",
        ],
    ),
    "pp=2 zero bubble x 2 chunks + sparse Engram updates": (
        2,
        [
            "parallel.pp=2",
            "parallel.pp_schedule=zero_bubble",
            "parallel.pp_stages_per_rank=2",
            SPARSE,
            "train.micro_batch_size=2",
        ],
    ),
    "hsdp=2x2 + sparse Engram updates": (
        4,
        ["parallel.dp_replicate=2", "parallel.dp_shard=2", SPARSE, "train.micro_batch_size=2"],
    ),
    # Anticipatory Routing's look-ahead forward stage by stage, its plans taken by the
    # schedule's forwards in order (full AC: the recomputed blocks take the same experts)
    "pp=2 (1F1B) + Anticipatory Routing + full AC": (
        2,
        ["parallel.pp=2", "parallel.activation_checkpoint=full", ROUTING, MICRO_4],
    ),
    # Anticipatory Routing's look-ahead forward under tp (its collectives, sequence
    # parallelism's gathers) and under FSDP with ep (gathers, expert all-to-alls): against
    # one process with it, and its collectives against the plan's look-ahead terms
    "tp=2 + sequence parallel + Anticipatory Routing": (2, [*TP_SP, ROUTING, MICRO_4]),
    "fsdp=4 x ep=2 + Anticipatory Routing": (
        4,
        ["parallel.dp_shard=4", "parallel.ep=2", ROUTING, "train.micro_batch_size=2"],
    ),
    # ep on 2 ranks (its forward and backward as with AdamW; 4 ranks: fsdp x ep above)
    "ep=2 + Muon": (2, ["parallel.dp_shard=2", "parallel.ep=2", MUON, ROUNDING_EPS, MICRO_4]),
    "tp=2 + sequence parallel + Muon": (2, [*TP_SP, MUON, ROUNDING_EPS, MICRO_4]),
    # each stage's matrices orthogonalised by its own ranks
    "pp=2 (1F1B) + Muon": (2, ["parallel.pp=2", MUON, ROUNDING_EPS, MICRO_4]),
    # experts sharded over ep and by FSDP within it (each rank's stack orthogonalised where
    # it lies)
    "fsdp=4 x ep=2 + Muon": (
        4,
        ["parallel.dp_shard=4", "parallel.ep=2", MUON, ROUNDING_EPS, "train.micro_batch_size=2"],
    ),
    # fsdp x tp: every matrix tp splits owned among the 4 ranks (dp_shard x tp), the
    # column-parallel ones (FSDP's strided shard) as the row-parallel ones
    "fsdp=2 x tp=2 + sequence parallel + Muon": (
        4,
        ["parallel.dp_shard=2", *TP_SP, MUON, ROUNDING_EPS, "train.micro_batch_size=2"],
    ),
}


def reference_of(overrides: list[str]) -> str:
    """The one-process run a layout is compared with: the same optimizer settings."""
    if ROUTING in overrides:
        return "one routing"
    return "one muon" if MUON in overrides else "one sparse" if SPARSE in overrides else "one"


# grouped-query attention: its KV heads split under tp (the V4 KV entry stays whole); the
# other layouts do not depend on the attention kind
GQA_LAYOUTS = {
    "gqa: tp=2 + sequence parallel": (2, [GQA, *TP_SP, MICRO_4]),
}
# `small`'s width (768, 12 heads, its experts and Engram tables) on 2 of its layers: the plan
# against measurement at a second scale; the sharded layouts against its one process
SMALL_WIDTH = [
    "model=small",
    "model.hidden_size=768",
    "model.num_layers=2",
    "model.num_heads=12",
    "model.num_kv_heads=4",
    "model.ffn_hidden_size=2048",
    "model.moe.expert_ffn_hidden_size=256",
    "model.engram.layers=[1]",
    "model.engram.table_size=8000",
    "model.engram.embed_dim=32",
]
SMALL_LAYOUTS = {
    "small: one": (1, [*SMALL_WIDTH, MICRO_4]),
    "small: fsdp=2": (2, [*SMALL_WIDTH, "parallel.dp_shard=2", MICRO_4]),
    "small: tp=2 + sequence parallel": (2, [*SMALL_WIDTH, *TP_SP, MICRO_4]),
}
EVERY_LAYOUT = {**LAYOUTS, **GQA_LAYOUTS, **SMALL_LAYOUTS}
# train.compile (test_compile.py has its one-process tests): blocks compiled under FSDP2 (its
# hooks outside the compiled forward), tensor and sequence parallelism (DTensor inside it; the
# MTP depth eager, see parallel/parallelize.compiled_block_slots) and pipeline stages, on the
# model cut to two layers and its MTP depth (3 blocks; CSA with a hash-routed MoE, then HCA
# with Engram), against one eager process of that model. aot_eager traces the graphs inductor
# would (dynamo, AOTAutograd, the checkpointed region) and runs eager kernels, in seconds
# instead of inductor's minutes of C++ compilation on this CPU.
TWO_LAYERS = [
    "model.num_layers=2",
    "model.attention.layer_types=[csa,hca]",
    "model.engram.layers=[1]",
]
AOT_EAGER = ["train.compile=true", "train.compile_backend=aot_eager"]
COMPILED_LAYOUTS = {
    "compiled: fsdp=2 + full AC": (
        2,
        [
            *TWO_LAYERS,
            "parallel.dp_shard=2",
            "parallel.activation_checkpoint=full",
            *AOT_EAGER,
            MICRO_4,
        ],
    ),
    "compiled: tp=2 + sequence parallel": (2, [*TWO_LAYERS, *TP_SP, *AOT_EAGER, MICRO_4]),
    "compiled: pp=2 (1F1B)": (2, [*TWO_LAYERS, "parallel.pp=2", *AOT_EAGER, MICRO_4]),
}
RUNS = {**EVERY_LAYOUT, **COMPILED_LAYOUTS}  # one torchrun per world size runs them all


@pytest.fixture(scope="module")
def results(tmp_path_factory, shakespeare_shards) -> tuple[dict[str, dict], dict[str, dict]]:
    """The 1-process references (V4 and GQA) and every layout (one torchrun per world size)."""
    out = tmp_path_factory.mktemp("layouts")
    with_data = {name: [shakespeare_shards, *o] for name, (_, o) in RUNS.items()}
    references = {
        "one": [shakespeare_shards, MICRO_4],
        "one, two layers": [shakespeare_shards, *TWO_LAYERS, MICRO_4],
        "one gqa": [shakespeare_shards, GQA, MICRO_4],
        "one sparse": [shakespeare_shards, SPARSE, MICRO_4],
        "one muon": [shakespeare_shards, MUON, ROUNDING_EPS, MICRO_4],
        "one routing": [shakespeare_shards, ROUTING, MICRO_4],
    }
    reference = run_layouts(out, 1, references)
    got = {}
    for ranks in sorted({ranks for ranks, _ in RUNS.values()}):
        names = [name for name, (r, _) in RUNS.items() if r == ranks]
        got.update(run_layouts(out, ranks, {name: with_data[name] for name in names}))
    return reference, got


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(results, layout):
    """V4 attention: the indexer's loss (a CSA layer's auxiliary loss) and its gradients too."""
    reference = reference_of(LAYOUTS[layout][1])
    assert_matches(results[0][reference], results[1][layout], with_tp="tp=2" in layout)


@pytest.mark.slow
def test_anticipatory_routing_through_the_pipeline_routes_as_one_process(results):
    """Every router of the pp=2 run (each on its stage) chose, forward by forward, exactly the
    experts one process with Anticipatory Routing chose: from step 2 the plans recorded a
    step earlier, which for some tokens differ from what one process without it chose at
    step 2 (both runs had the same parameters then)."""
    one, plain = results[0]["one routing"], results[0]["one"]
    got = results[1]["pp=2 (1F1B) + Anticipatory Routing + full AC"]["routes"]
    assert got.keys() == one["routes"].keys() and got
    micro_batches = len(one["routes"]["blocks.1.ffn.router"]) // STEPS
    for name, expected in one["routes"].items():
        assert len(got[name]) == len(expected) == STEPS * micro_batches, name
        assert all(torch.equal(a, b) for a, b in zip(got[name], expected, strict=True)), name
    step_2 = slice(micro_batches, 2 * micro_batches)
    changed = sum(
        int((a != b).any(-1).sum())
        for name in one["routes"]
        for a, b in zip(one["routes"][name][step_2], plain["routes"][name][step_2], strict=True)
    )
    assert changed > 0


@pytest.mark.slow
def test_sparse_engram_gradients_equal_the_dense_ones(results):
    """How the tables' gradients are held does not change them: the first step's gradients
    and the first two losses (the second step moves only rows the first looked up, which
    dense AdamW moves alike) equal the dense run's; the third loss differs (the dense run
    also moves rows along their old momentum). The lazy row update and dense AdamW round
    differently: the second losses differ by a float32 step or two at 11 (1.9e-6 on
    2026-12-05, under 1e-6 before), the third by 3.2e-4."""
    dense, sparse = results[0]["one"], results[0]["one sparse"]
    assert relative_error(sparse["first_grads"], dense["first_grads"]) < 1e-7
    assert sparse["losses"][:2] == pytest.approx(dense["losses"][:2], abs=1e-5)
    assert sparse["losses"][2] != pytest.approx(dense["losses"][2], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(COMPILED_LAYOUTS))
def test_compiled_layout_matches_one_eager_process(results, layout):
    """Losses, router biases and gradients, as for every layout above."""
    reference = results[0]["one, two layers"]
    assert_matches(reference, results[1][layout], with_tp="tp=2" in layout)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(GQA_LAYOUTS))
def test_gqa_layout_matches_one_process(results, layout):
    assert_matches(results[0]["one gqa"], results[1][layout], with_tp="tp=2" in layout)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [name for name in SMALL_LAYOUTS if name != "small: one"])
def test_small_layout_matches_one_process(results, layout):
    assert_matches(results[1]["small: one"], results[1][layout], with_tp="tp=2" in layout)


def assert_matches(expected: dict, got: dict, with_tp: bool) -> None:
    assert got["losses"] == pytest.approx(expected["losses"], abs=2e-3)
    # Clipping sees the norm of the whole model, however it is sharded.
    assert got["grad_norms"][0] == pytest.approx(expected["grad_norms"][0], rel=1e-5)
    # The aux-loss-free bias update uses the global load: the same biases after 3 steps, and
    # every routed token of the global batch is counted.
    assert sorted(got["router_biases"]) == sorted(expected["router_biases"])
    for name, bias in expected["router_biases"].items():
        torch.testing.assert_close(got["router_biases"][name], bias, rtol=0, atol=1e-6)
    first_step_tolerance = 1e-4 if with_tp else 1e-5
    assert relative_error(got["first_grads"], expected["first_grads"]) < first_step_tolerance
    assert relative_error(got["grads"], expected["grads"]) < 5e-2


# `birkhoff plan` against what the layouts measured (tests/layout_probe.py): the state a rank
# holds, the bytes of each collective per step (tp's apart from the others), and the peak.
PLANNED = list(LAYOUTS)
KIND = {
    "fsdp_all_gather": "all_gather",
    "fsdp_reduce_scatter": "reduce_scatter",
    "hsdp_all_reduce": "all_reduce",
    "ddp_all_reduce": "all_reduce",
    "ddp_broadcast": "broadcast",
    "ep_all_to_all": "all_to_all",
    "engram_all_to_all": "all_to_all",
    "engram_sparse_all_gather": "all_gather",
    "muon_all_to_all": "all_to_all",
    "muon_dp_tp_all_to_all": "all_to_all",
    "muon_tp_all_to_all": "all_to_all@tp",
    "pp_send_recv": "send_recv",
    "tp_all_reduce": "all_reduce@tp",
    "tp_all_gather": "all_gather@tp",
    "tp_reduce_scatter": "reduce_scatter@tp",
}


def planned(overrides: list[str], ranks: int):
    recipe = typed_recipe(compose_recipe([*SMALL_OVERRIDES, *MODEL, *overrides]))
    recipe.model.validate()
    work = workload_of(recipe)
    micro, optim = recipe.train.micro_batch_size, recipe.optim
    routing = recipe.train.anticipatory.mode == "always"
    layout = layout_of(recipe.parallel, micro, ranks, optim.engram_update, optim.name,
                       anticipatory=routing)  # fmt: skip
    return build_inventory(recipe.model), layout, work


@pytest.mark.slow
@pytest.mark.parametrize("layout", [*PLANNED, *GQA_LAYOUTS, *SMALL_LAYOUTS])
def test_plan_predicts_what_a_rank_holds_and_sends(results, layout, shakespeare_shards):
    """Parameters and AdamW state of the fullest rank within 2% (gradients too where no
    accumulation keeps them unsharded mid-step), and per pipeline rank the mean bytes of
    its ranks per collective kind within 5% (a kind the plan does not expect: under 1% of
    all bytes: losses, norms, token counts)."""
    ranks, overrides = EVERY_LAYOUT[layout]
    recipe = [shakespeare_shards, *overrides, f"launch.nproc_per_node={ranks}"]
    inv, plan_layout, work = planned(recipe, ranks)
    probes = results[1][layout]["probes"]
    cluster = Cluster("gloo", ranks, 1000, 1, 1, 1, ranks, foreach_optimizer=False)  # a CPU
    memory = estimate(inv, plan_layout, work, cluster).memory_gib
    fullest = max((p["held_after_backward"] for p in probes), key=lambda h: sum(h.values()))
    accumulated = work.global_batch > plan_layout.micro_batch * plan_layout.dp
    kept_unsharded = accumulated and not plan_layout.fsdp_reduce_every_micro_batch
    kinds = ["params", "optimizer"] + (
        [] if plan_layout.dp_shard > 1 and kept_unsharded else ["grads"]
    )
    # Sparse table gradients hold the rows a step looked up: the plan's is an upper bound
    # (every lookup a distinct row), and so is their gather's payload.
    bounded = {"grads"} if plan_layout.engram_sparse else set()
    for kind in kinds:
        if kind in bounded:
            assert fullest[kind] <= memory[kind] * GIB * 1.02, kind
        else:
            assert fullest[kind] == pytest.approx(memory[kind] * GIB, rel=0.02), kind
    per_rank = len(probes) // plan_layout.pp
    for stage in range(plan_layout.pp):  # a pipeline rank, with every chunk it runs
        measured = mean_bytes(probes[stage * per_rank : (stage + 1) * per_rank])
        expected: dict[str, float] = {}
        bound: dict[str, float] = {}
        for name, size in communication(inv, plan_layout, work, stage).items():
            if name in KIND and size:
                into = bound if name == "engram_sparse_all_gather" else expected
                into[KIND[name]] = into.get(KIND[name], 0.0) + size
        assert set(expected) | set(bound) <= set(measured), (stage, expected, measured)
        total = sum(measured.values())
        for kind, size in measured.items():
            low, high = expected.get(kind, 0.0), expected.get(kind, 0.0) + bound.get(kind, 0.0)
            if kind in bound:
                assert low * 0.95 < size <= high * 1.05, (stage, kind, low, size, high)
            elif kind in expected:
                assert size == pytest.approx(expected[kind], rel=0.05), (stage, kind)
            else:
                assert size < 0.01 * total, (stage, kind, size)


MUON_RUNS = {
    "one": (1, [MUON, ROUNDING_EPS, MICRO_4]),
    **{name: run for name, run in EVERY_LAYOUT.items() if MUON in run[1]},
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(MUON_RUNS))
def test_plan_spreads_muon_s_newton_schulz_runs_as_the_ranks_run_them(
    results, layout, shakespeare_shards
):
    """Muon's Newton-Schulz runs in a step, of one matrix and of several batched (matrices
    of one shape, expert stacks), the mean over the ranks of each pipeline rank: exactly the
    plan's runs for that rank's stages, which its launch count charges (each owner its
    matrices by shape per bucket; each rank its own experts with what else it computes)."""
    ranks, overrides = MUON_RUNS[layout]
    run = results[0]["one muon"] if layout == "one" else results[1][layout]
    recipe = [shakespeare_shards, *overrides, f"launch.nproc_per_node={ranks}"]
    inv, plan_layout, _ = planned(recipe, ranks)
    kinds = ("matrix", "stack")
    per_rank = ranks // plan_layout.pp
    stages = stage_layers(inv.cfg.num_layers, plan_layout.num_stages)
    for stage in range(plan_layout.pp):  # a pipeline rank: the ranks of its stages
        probes = run["probes"][stage * per_rank : (stage + 1) * per_rank]
        runs = [probe["newton_schulz_runs"] for probe in probes]
        measured = {kind: sum(r[kind] for r in runs) / per_rank for kind in kinds}
        keys = rank_keys(plan_layout, stages, stage)
        expected = newton_schulz_runs(inv, plan_layout, keys)
        assert measured == pytest.approx(expected, rel=1e-9), stage
        assert measured["stack"] > 0  # batched runs (one process may have no single one)


def mean_bytes(probes: list[dict]) -> dict[str, float]:
    """Bytes per collective kind, the mean over `probes` (ranks); tp's as "KIND@tp", the
    other dimensions' together."""
    measured: dict[str, float] = {}
    for probe in probes:
        for key, size in probe["comm"].items():
            kind, dim = key.split("@")
            name = key if dim == "tp" else kind
            measured[name] = measured.get(name, 0.0) + size / len(probes)
    return measured


# The peak. Before the activation terms were counted tensor by tensor (2026-12-02) the plan
# was 0.80-0.83 of this peak for one process, tp, tp + sp and pp, and before it walked the
# schedule's order, 0.60 for zero bubble's last rank: this test fails either. Measured on 14
# layouts, one of each kind at tiny's scale and three at small's width (the profiler that
# reads the CPU allocator costs seconds per rank and layout); the layouts left out combine
# kinds measured here.
PEAK_PLANNED = [
    "one",
    "fsdp=2",
    "tp=2",
    "tp=2 + sequence parallel",
    "pp=2 (1F1B)",
    "pp=2 interleaved 1F1B x 2 chunks + full AC",
    "pp=2 zero bubble x 2 chunks + sparse Engram updates",
    "fsdp=2 x ep=2",
    "hsdp=2x2 + selective AC + Engram rows sharded",
    "ep=2 + Muon",
    *GQA_LAYOUTS,
    *SMALL_LAYOUTS,
]


@pytest.mark.slow
@pytest.mark.parametrize("layout", PEAK_PLANNED)
def test_plan_predicts_the_peak_memory_of_a_rank(results, layout, shakespeare_shards):
    """The plan's total per device within 15% of the fullest rank's measured peak: the bytes
    it held at the start of its second step plus the most the allocator's bytes rose above
    that during the step (tests/layout_probe.py)."""
    ranks, overrides = (1, [MICRO_4]) if layout == "one" else EVERY_LAYOUT[layout]
    recipe = [shakespeare_shards, *overrides, f"launch.nproc_per_node={ranks}"]
    inv, plan_layout, work = planned(recipe, ranks)
    cluster = Cluster("gloo", ranks, 1000, 1, 1, 1, ranks, foreach_optimizer=False)  # a CPU
    planned_bytes = estimate(inv, plan_layout, work, cluster).memory_gib["total"] * GIB
    probes = (results[0] if layout == "one" else results[1])[layout]["probes"]
    peaks = [sum(p["held_at_start"].values()) + p["allocated_peak_growth"] for p in probes]
    assert planned_bytes == pytest.approx(max(peaks), rel=0.15), [p / 2**20 for p in peaks]
