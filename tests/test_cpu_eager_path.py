"""The cpu backend's ops run two ways (kernels/cpu_library.py): eager code calls each op's Python
body through an autograd Function, torch.ops (opcheck, tracing) the custom op registered from
the same body, with torch.library's autograd. Every op a `tiny` training step calls, replayed
through its custom op: the same outputs and input gradients, bit for bit. (The other tests
hold the eager path to float64 oracles; opcheck holds the custom ops to their schemas.)"""

from __future__ import annotations

import torch
from torch import Tensor

from birkhoff.kernels import cpu_mhc, cpu_mhc_read
from birkhoff.kernels.cpu_paths import EAGER_PATHS as PATHS
from birkhoff.launch.recipe import load_recipe
from birkhoff.model.transformer import build_model
from conftest import compose_recipe


def _record(calls: dict, op, run):
    """`run` that keeps the first call's arguments (detached copies) under `op`."""

    def recording(*args):
        kept = [a.detach().clone().requires_grad_(a.requires_grad) if _leaf(a) else a for a in args]
        calls.setdefault(op, (run, kept))
        return run(*args)

    return recording


def _leaf(value) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


def _outputs_and_grads(run, args: list, seed: int) -> tuple[list[Tensor], list[Tensor | None]]:
    leaves = [a.detach().clone().requires_grad_(a.requires_grad) if _leaf(a) else a for a in args]
    out = run(*leaves)
    outputs = [out] if isinstance(out, Tensor) else list(out)
    differentiable = [o for o in outputs if o.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=generator) for o in differentiable]
    wanted = [t for t in leaves if _leaf(t) and t.requires_grad]
    grads = torch.autograd.grad(differentiable, wanted, weights, allow_unused=True)
    return [o.detach() for o in outputs], list(grads)


def test_every_op_of_a_tiny_step_matches_its_custom_op(monkeypatch) -> None:
    calls: dict = {}
    for module, attribute, op in PATHS:
        monkeypatch.setattr(module, attribute, _record(calls, op, getattr(module, attribute)))
    passing = cpu_mhc_read._ReadPassingStreams  # the read hands its streams on: a Function
    monkeypatch.setattr(
        passing, "apply", _record(calls, cpu_mhc_read.mhc_read_op, passing.apply)
    )  # fmt: skip
    recipe, _ = load_recipe(compose_recipe(["model=tiny"]), env={})
    model = build_model(recipe.model, "cpu", seed=0)
    tokens = torch.randint(0, 500, (2, 65), generator=torch.Generator().manual_seed(0))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    # not on tiny's path (its hyper-connections read through mhc_read): the mappings alone
    streams = torch.randn(2, 5, 4, 8, requires_grad=True)
    weight = torch.randn(24, 32, requires_grad=True)
    biases = [torch.randn(4), torch.randn(4), torch.randn(4, 4)]
    cpu_mhc.mhc_mapping(streams, weight, torch.rand(3) + 0.5, *biases, 1e-6, 20, 1e-6)
    cpu_mhc.sinkhorn_knopp(torch.randn(3, 4, 4, requires_grad=True), 20)

    assert set(calls) == {op for *_, op in PATHS} | {cpu_mhc_read.mhc_read_op}
    for seed, (op, (eager, args)) in enumerate(calls.items()):
        run_op = op
        if op is cpu_mhc_read.mhc_read_op:  # the Function passes the streams, the op q, 1/rms
            eager, run_op = (lambda *a, f=eager: f(*a)[:3]), (lambda *a, g=op: g(*a)[:3])
        eager_out, eager_grads = _outputs_and_grads(eager, args, seed)
        op_out, op_grads = _outputs_and_grads(run_op, args, seed)
        assert len(eager_out) == len(op_out), op
        for i, (e, o) in enumerate(zip(eager_out, op_out, strict=True)):
            assert torch.equal(e, o), f"{op}: output {i}"
        assert any(g is not None for g in op_grads), op
        for i, (e, o) in enumerate(zip(eager_grads, op_grads, strict=True)):
            assert (e is None) == (o is None), f"{op}: gradient {i}"
            assert e is None or torch.equal(e, o), f"{op}: gradient {i}"
