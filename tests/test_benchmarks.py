"""The benchmark scripts still fit the code they call.

Nothing runs them in the suite (each takes minutes), and three of them once failed at start for
a month after `model_throughput.build` and `step` changed their signatures. This test imports
every script and binds each call it makes to a function of birkhoff or of another benchmark
against that function's current signature: a renamed, removed or re-parameterised function
fails here, in seconds, instead of when someone next needs the numbers."""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import tempfile
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


@pytest.fixture(scope="module")
def benchmark_path():
    sys.path.insert(0, str(BENCHMARKS))
    yield
    sys.path.remove(str(BENCHMARKS))


def _ours(target: object) -> bool:
    module = getattr(target, "__module__", "") or ""
    return module.startswith("birkhoff") or module in SCRIPTS


def _resolve(node: ast.expr, namespace: dict) -> object | None:
    """What a call's function names in the script's globals (`f`, `module.f`, `Class.f`)."""
    if isinstance(node, ast.Name):
        return namespace.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, namespace)
        if inspect.ismodule(owner) or inspect.isclass(owner):
            return getattr(owner, node.attr, None)
    return None


def _local_names(tree: ast.Module) -> set[str]:
    """Names bound inside functions (arguments, assignments): a call through one of them is
    not a call of the global of that name."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def unbindable_calls(script: str) -> tuple[int, list[str]]:
    """(calls checked, one line per call that does not bind to its target's signature)."""
    module = importlib.import_module(script)
    tree = ast.parse((BENCHMARKS / f"{script}.py").read_text())
    shadowed = _local_names(tree)
    checked, problems = 0, []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Name) and node.func.id in shadowed:
            continue
        target = _resolve(node.func, vars(module))
        if not (inspect.isfunction(target) or inspect.isclass(target)) or not _ours(target):
            continue
        if any(isinstance(a, ast.Starred) for a in node.args):
            continue  # a spread list: its length is not in the source
        if any(k.arg is None for k in node.keywords):
            continue  # **kwargs
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            continue
        checked += 1
        try:
            signature.bind(*node.args, **{k.arg: k.value for k in node.keywords})
        except TypeError as error:
            name = ast.unparse(node.func)
            problems.append(f"{script}.py:{node.lineno}: {name}{signature}: {error}")
    return checked, problems


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_calls_bind(benchmark_path, script):
    checked, problems = unbindable_calls(script)
    assert not problems, "\n".join(problems)
    assert checked, f"{script}.py calls nothing of birkhoff's that this test can see"


def test_the_mhc_floor_runs_no_mhc_op(benchmark_path, monkeypatch):
    """mhc_floor's stand-ins replace every mHC op a hyper-connection calls (the floor once
    kept running the real mappings and read after the model moved to `mhc_read`): with the
    reference's projection, stream read and merge made to fail, a floored model still runs
    forward and backward."""
    import mhc_floor

    from birkhoff.kernels import mhc_reference
    from birkhoff.model import build_model
    from conftest import small_model

    net = mhc_floor.with_floor_ops(build_model(small_model(max_seq_len=16), "reference"))

    def fail(*args, **kwargs):
        raise AssertionError("an mHC op ran in the floored model")

    monkeypatch.setattr(mhc_reference, "normalised_projection", fail)
    monkeypatch.setattr(mhc_reference._StreamRead, "apply", fail)
    monkeypatch.setattr(mhc_reference._StreamMerge, "apply", fail)
    tokens = torch.randint(0, 50, (2, 17))
    net(tokens[:, :-1], tokens[:, 1:]).backward()


def test_mhc_stream_ops_swaps_the_read_every_join_calls(benchmark_path, monkeypatch):
    """mhc_stream_ops times the former stream read in every join: hyper-connections call
    `mhc_read`, so `use` must rebuild it around the read it swaps in."""
    import mhc_stream_ops

    from birkhoff.kernels import mhc_reference
    from birkhoff.model import build_model
    from conftest import small_model

    calls = []

    def counted_pre(streams, h_pre):
        calls.append(streams.shape)
        return mhc_reference.mhc_pre(streams, h_pre)

    monkeypatch.setitem(
        mhc_stream_ops.FORMS, "former", {**mhc_stream_ops.CURRENT, "pre": counted_pre}
    )
    net = build_model(small_model(max_seq_len=16), "reference")
    mhc_stream_ops.use(net, "former")
    tokens = torch.randint(0, 50, (2, 17))
    net(tokens[:, :-1], tokens[:, 1:])
    joins = sum(isinstance(m, mhc_stream_ops.HyperConnection) for m in net.modules())
    assert len(calls) == joins + 1  # every join's read and the readout's


def test_the_16b_class_step_takes_the_most_layers_the_plan_fits_in_the_gpu(benchmark_path):
    """device_checks runs the 16B-class shape at as many of its 8 layers as the plan's peak
    (micro-batches accumulated: the whole gradient held beside a micro-batch's activations)
    fits within the margin of the GPU's memory: all 8 on an H200 (planned 100 GiB), fewer on
    an H100, whose 80 GB the 8 layers' weights, gradients and moments alone (77.7 GiB) fill;
    the step's command carries them, Engram's layers moved with them, and the micro-batches."""
    import argparse

    import device_checks

    h100 = 81_559 / 1024  # nvidia-smi's memory.total, MiB
    assert device_checks.fitting_layers(143_771 / 1024) == 8
    assert device_checks.fitting_layers(40.0) is None  # an A100-40: the step is left out
    layers = device_checks.fitting_layers(h100)
    assert layers is not None and 4 <= layers < 8
    margin = device_checks.MEMORY_MARGIN * h100
    assert device_checks.planned_gib(layers) <= margin < device_checks.planned_gib(layers + 1)
    args = argparse.Namespace(kernels="triton", smoke=False, steps=30, big_layers=layers)
    args.big_micro_batches = device_checks.BIG_MICRO_BATCHES
    with tempfile.TemporaryDirectory() as scratch:
        steps = {name: command for name, command, *_ in device_checks.plan(args, Path(scratch))}
    command = steps["throughput_16b_class"]
    overrides = command[command.index("--set") + 1 :]
    assert overrides[-2:] == [f"model.num_layers={layers}", f"model.engram.layers=[1,{layers - 2}]"]
    assert command[command.index("--micro-batches") + 1] == "8"


def test_micro_batches_accumulate_the_gradient_of_one_batch(benchmark_path):
    """model_throughput's step with K micro-batches of the same tokens hands the optimizer
    the gradient one forward and backward of them gives (each loss / K, as the trainer)."""
    import model_throughput

    from birkhoff.model import build_model
    from conftest import small_model

    class Recorder(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]

    torch.manual_seed(0)
    net = build_model(small_model(max_seq_len=16), "reference")
    tokens = torch.randint(0, 50, (2, 17))
    net(tokens[:, :-1], tokens[:, 1:]).backward()
    once = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    recorder = Recorder(net.parameters())
    model_throughput.step(net, recorder, tokens, False, micro_batches=3)
    for got, want in zip(recorder.grads, once, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
