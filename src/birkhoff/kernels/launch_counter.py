"""Kernel launches counted on the CPU: every aten op that runs a kernel (views and
allocations run none) and every Triton launch where Triton's interpreter runs it (the
interpreter's own tensor copies are not counted).

`launches_per_call` counts one call of an op and its backward; run as a module under
`TRITON_INTERPRET=1` (Triton decides at import whether its kernels are interpreted, so a
process that imported them compiled cannot count them), it does so for each op of a backend
on the arguments a model gave it:

    TRITON_INTERPRET=1 python -m birkhoff.kernels.launch_counter triton CALLS.pt

CALLS.pt holds {key: (op, args, kwargs, which outputs get a gradient)} (torch.save); it
prints {key: [forward, backward]}.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

NO_KERNEL = {"empty", "empty_strided", "empty_like", "lift_fresh", "_local_scalar_dense"}
# an allocation, a 3-D matmul's reshape of its product (a view autograd does not track) and a
# dtype query: no kernel either (counted until 2026-12-07: 188 of tiny's 5,869 reference ops)
NO_KERNEL |= {"new_empty", "_unsafe_view", "promote_types"}
# the profiler's bookkeeping (the optimizer's step is wrapped in one record, two where a
# profiler hook was ever registered in the process): no kernel either
NO_KERNEL |= {"_record_function_enter", "_record_function_enter_new", "_record_function_exit"}


class LaunchCounter(TorchDispatchMode):
    """Counts the aten ops that run a kernel while not paused; `triton()` adds the launches
    Triton's interpreter runs."""

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.by_name: Counter[str] = Counter()  # "aten.mul", "triton._mhc_post_kernel"
        self.paused = 0  # depth: pauses nest (an op's backward inside another's)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in NO_KERNEL:
            self.launches += 1
            self.by_name[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def pause(self) -> Iterator[None]:
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    @contextmanager
    def triton(self) -> Iterator[None]:
        """Every interpreted Triton launch counts one, the interpreter's work inside it none."""
        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run

        def run(kernel, *args, **kwargs):
            if not self.paused:
                self.launches += 1
                self.by_name[f"triton.{kernel.fn.__name__}"] += 1
            with self.pause():
                return original(kernel, *args, **kwargs)

        InterpretedFunction.run = run
        try:
            yield
        finally:
            InterpretedFunction.run = original


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in an op's arguments or outputs (in tuples, lists and dicts: pytree's
    containers); a dataclass there is refused, its tensors would be missed."""
    leaves = tree_leaves(value)
    if any(dataclasses.is_dataclass(leaf) for leaf in leaves):
        raise TypeError("counted ops take tensors in tuples, lists and dicts, not dataclasses")
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def launches_per_call(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    grad_outputs: list[bool] | None = None,
) -> tuple[int, int]:
    """Launches of `fn(*args, **kwargs)` and of its backward: gradients to every floating
    input that requires one, from the outputs `grad_outputs` marks (default: every output
    that has one; 0 when none has). Triton launches count where the interpreter is on."""
    interpreted = _interpreting()
    counter = LaunchCounter()
    with counter, counter.triton() if interpreted else _nothing():
        out = fn(*args, **kwargs)
    outputs = tensors_in(out)
    marked = grad_outputs if grad_outputs is not None else [True] * len(outputs)
    outputs = [t for t, m in zip(outputs, marked, strict=True) if m and t.requires_grad]
    inputs = [t for t in tensors_in((args, kwargs)) if t.requires_grad]
    forward = counter.launches
    if not outputs or not inputs:
        return forward, 0
    grads = [torch.randn_like(t) for t in outputs]
    counter = LaunchCounter()
    with counter, counter.triton() if interpreted else _nothing():
        torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    return forward, counter.launches


def _interpreting() -> bool:
    return (
        os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
    )


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def main(argv: list[str]) -> None:
    from birkhoff import kernels

    backend, path = argv
    calls = torch.load(path, weights_only=True)
    counts = {}
    for key, (op, args, kwargs, grad_outputs) in calls.items():
        torch.manual_seed(0)
        counts[key] = launches_per_call(kernels.get(op, backend), args, kwargs, grad_outputs)
    print(json.dumps(counts))


if __name__ == "__main__":
    main(sys.argv[1:])
