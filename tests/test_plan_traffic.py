"""The plan's device-memory traffic (parallel/planning/traffic.py) against bytes counted: a
dispatch mode adds up what every aten op outside the matmuls reads (its tensor arguments) and
writes (new outputs, and arguments it mutates) while torch's AdamW, birkhoff's Muon, the
gradient clipping and the model's forward and backward run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from birkhoff.errors import RecipeError
from birkhoff.launch.plan_command import plan_command
from birkhoff.launch.recipe import typed_recipe
from birkhoff.model import build_model
from birkhoff.model.budget import apply_sparse_budget
from birkhoff.parallel.distributed import DistributedContext
from birkhoff.parallel.grad_norm import clip_grad_norm
from birkhoff.parallel.planning.activations import block_terms, bytes_per_token, head_terms
from birkhoff.parallel.planning.cluster import cluster_from
from birkhoff.parallel.planning.traffic import (
    ACTIVATION_TRAFFIC,
    ADAMW_BYTES,
    ADAMW_NO_DECAY_BYTES,
    CLIP_BYTES,
    MUON_BYTES,
    muon_iteration_bytes,
    muon_run_bytes,
)
from birkhoff.train.muon import MuonV4
from conftest import compose_recipe

aten = torch.ops.aten
MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten._grouped_mm, aten.linear}


def _bytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(values) if torch.is_tensor(t))


class MovedBytes(TorchDispatchMode):
    """Bytes that ops outside the matmuls read and write; views move nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        if func.overloadpacket in MATMULS:
            return out
        given = [*args, *(kwargs.get(a.name) for a in schema.arguments[len(args) :])]
        mutated = [v for a, v in zip(schema.arguments, given, strict=False)
                   if a.alias_info is not None and a.alias_info.is_write]  # fmt: skip
        returns = out if isinstance(out, tuple) else (out,)
        new = [v for r, v in zip(schema.returns, returns, strict=False) if r.alias_info is None]
        if mutated or new:
            self.total += _bytes((args, kwargs)) + _bytes(mutated) + _bytes(new)
        return out


def _params(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


@pytest.mark.parametrize("decay", [0.1, 0.0])
def test_adamw_moves_what_the_plan_counts_per_element(decay):
    params = _params([(64, 48), (300,), (7, 5, 3)])
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=decay, foreach=False)
    optimizer.step()  # the moments exist from here on, as in every later step
    with MovedBytes() as moved:
        optimizer.step()
    elements = sum(p.numel() for p in params)
    expected = ADAMW_BYTES if decay else ADAMW_NO_DECAY_BYTES
    assert moved.total == pytest.approx(expected * elements, rel=1e-3)


def test_muon_moves_what_the_plan_counts_beside_its_matmuls():
    """Momentum, Nesterov input, norm, scale, decay and update per element, per Newton-Schulz
    iteration 12 n^2 bytes and per run 36 n^2; a tall, a wide and a square matrix, a run
    each."""
    shapes = [(96, 32), (24, 80), (40, 40)]
    params = _params(shapes)
    group = {"params": params, "muon": True, "lr": 1e-3, "weight_decay": 0.1,
             "momentum": 0.95, "update_rms": 0.18}  # fmt: skip
    optimizer = MuonV4([group], lr=1e-3)
    optimizer.step()
    with MovedBytes() as moved:
        optimizer.step()
    expected = sum(
        MUON_BYTES * r * c + 10 * muon_iteration_bytes(r, c) + muon_run_bytes(r, c)
        for r, c in shapes
    )
    assert moved.total == pytest.approx(expected, rel=1e-3)


def test_clipping_reads_and_scales_every_gradient():
    params = _params([(64, 48), (300,)])
    for p in params:  # on CPU torch's foreach ops run per tensor
        p.grad = p.grad.contiguous()
    with MovedBytes() as moved:
        clip_grad_norm(params, 1e-3, DistributedContext(0, 0, 1, None))
    elements = sum(p.numel() for p in params)
    assert moved.total == pytest.approx(CLIP_BYTES * elements, rel=0.01)


WIDE = {
    "small": ["model=small"],
    "small, 16B-class widths": [
        "model=small", "model.hidden_size=1024", "model.num_layers=2", "model.num_heads=8",
        "model.num_kv_heads=4", "model.moe.num_experts=8", "model.moe.top_k=6",
        "model.moe.expert_ffn_hidden_size=704", "model.engram.layers=[1]", "data.seq_len=64",
    ],
}  # fmt: skip


@pytest.mark.parametrize("shape", list(WIDE))
def test_activation_traffic_is_the_factor_times_what_autograd_saves(shape):
    """Per token (two batch sizes apart, so that what scales with the parameters drops
    out): the non-matmul bytes of a forward and backward against ACTIVATION_TRAFFIC times the
    bytes the plan's activation terms say autograd saves."""
    recipe = typed_recipe(compose_recipe(WIDE[shape]))
    cfg, seq = recipe.model, recipe.data.seq_len
    sized = apply_sparse_budget(cfg)
    model = build_model(cfg, seed=0)
    counted = []
    for batch in (1, 3):
        tokens = torch.randint(0, sized.vocab_size, (batch, seq))
        model.zero_grad(set_to_none=True)
        with MovedBytes() as moved:
            model(tokens, tokens.roll(-1, dims=1)).backward()
        counted.append(moved.total)
    per_token = (counted[1] - counted[0]) / (2 * seq)
    layers = range(sized.num_layers + sized.mtp.depth)
    saved = sum(bytes_per_token(block_terms(sized, i, seq, 4), 1, False, "all") for i in layers)
    saved += bytes_per_token(head_terms(sized, 4), 1, False, "all")
    assert per_token == pytest.approx(ACTIVATION_TRAFFIC * saved, rel=0.25)


def test_the_h200_16b_class_step_is_predicted_within_a_quarter(capsys):
    """The one accelerator measurement of a shape big enough not to be bound by kernel
    launches (benchmarks/results/h200_2026-12-04_run2.json: the 16B-class shape of
    device_checks.py, 8 x 1,024 tokens, bf16 autocast, AdamW, eager, 24,404 tokens/s): the
    matmuls alone are a fifth of the step; with the memory traffic the plan is within 25%,
    and under it (it leaves launch overhead out). Not fitted: the factors come from counts
    on this CPU, the bandwidth from the H200's data sheet."""
    results = Path(__file__).parents[1] / "benchmarks/results/h200_2026-12-04_run2.json"
    run = json.loads(results.read_text())["throughput_16b_class"]["json"]
    assert run["shape_override"] == [8, 1024] and run["bf16"] and not run["compiled"]
    measured = 8 * 1024 / run["models"]["small"]["tokens_per_s"]["default"]
    overrides = ["model=small", *run["set"], "optim=adamw_cosine", "cluster.preset=h200",
                 "cluster.devices=1", "train.global_batch_size=8", "train.micro_batch_size=8",
                 "data.seq_len=1024", "train.mixed_precision=bf16",
                 "parallel.activation_checkpoint=none", "parallel.tp=1"]  # fmt: skip
    assert plan_command([*overrides, "--json"]) == 0
    (layout,) = json.loads(capsys.readouterr().out)["layouts"]
    assert layout["compute_s"] < 0.25 * measured
    assert 0.75 * measured < layout["step_s"] < measured


def test_the_memory_keys_are_checked_before_planning():
    """A preset brings its bandwidth; a cluster of one's own must give it; the efficiency is a
    share."""
    assert cluster_from({"preset": "h200", "devices": 8}).memory_gbps == 4800
    custom = {"devices": 8, "device_memory_gib": 80, "peak_tflops": 900, "intra_node_gbps": 400,
              "inter_node_gbps": 50, "node_size": 8, "host_gbps": 64}  # fmt: skip
    with pytest.raises(RecipeError, match=r"'cluster\.memory_gbps' = None: must be set"):
        cluster_from(custom)
    assert cluster_from({**custom, "memory_gbps": 3000}).memory_efficiency == 0.8
    with pytest.raises(
        RecipeError, match=r"'cluster.memory_efficiency' = 1.5: must be in \(0, 1\]"
    ):
        cluster_from({"preset": "h200", "devices": 8, "memory_efficiency": 1.5})
