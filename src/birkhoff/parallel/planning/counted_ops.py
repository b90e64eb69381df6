"""A backend's own ops, counted per call in a model that runs the reference kernels.

The launch count (launches.py) runs a narrowed model on this CPU. For a backend whose
kernels cannot run here at speed (`triton`: only Triton's interpreter, far too slow for a
whole V4 model), the model runs the reference kernels, and each op the backend implements
itself is a stand-in: one autograd node, as a fused op is, that runs the reference with the
count paused, forward and backward, and tallies its calls. Its first call's arguments are
kept, one per layout of its tensors (liger's ops copy a strided input first), with which
outputs got a gradient; a child process with Triton's interpreter on
(`kernels/launch_counter.py`) counts what the backend's op launches on them, forward and
backward, and each call is charged that (an op's launches do not depend on its shapes).
tests/test_plan_launches.py checks the total against the model run with the backend itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from birkhoff import kernels
from birkhoff.errors import RecipeError
from birkhoff.kernels.launch_counter import LaunchCounter, tensors_in

# Ops a backend implements that the count leaves on the reference, and why
LEFT_ON_REFERENCE = {
    "v4_attention": "FlexAttention has no backward on the CPU",
    "linear_cross_entropy": "liger's chunks depend on the vocabulary and width the narrowed "
    "model changes",
}


def _given(value: object) -> bool:
    """A keyword option that is set: not a tensor (those count in the layout), None or False."""
    return not isinstance(value, torch.Tensor) and value is not None and value is not False


class CountedOps:
    """Replaces `model`'s references to the ops `backend` implements (but those in
    LEFT_ON_REFERENCE) by stand-ins that pause `counter` (the caller sets it per count) and
    tally their calls."""

    def __init__(self, model: nn.Module, backend: str) -> None:
        self.backend = backend
        self.counter = LaunchCounter()
        self.tally: Counter[tuple[str, str]] = Counter()
        # by op and the layout of its tensors: (op, args, kwargs) of the first such call
        self.first_calls: dict[str, tuple[str, tuple, dict]] = {}
        self.grad_outputs: dict[str, list[bool]] = {}  # which outputs got a gradient
        self.returned_tensor = False  # the last op called returned a tensor, not a tuple
        own = kernels.implementations(backend)
        ops = {
            kernels.get(op, "reference"): op
            for op, impl in own.items()
            if impl == backend and backend != "reference" and op not in LEFT_ON_REFERENCE
        }
        swap_ops(model, {fn: self._stand_in(op, fn) for fn, op in ops.items()})

    def take(self) -> Counter[tuple[str, str]]:
        """The calls tallied since the last take: (op and layout, "forward" or "backward")
        -> calls."""
        tally, self.tally = self.tally, Counter()
        return tally

    def _stand_in(self, op: str, reference):
        def run(*args, **kwargs):
            tensors = tensors_in((args, kwargs))
            # an op may launch more for other layouts (liger copies a strided input first)
            # and for the options it is given (rope_trailing's norm_eps adds a norm)
            key = op + "/" + "".join("c" if t.is_contiguous() else "s" for t in tensors)
            key += "".join(f"+{name}" for name, value in sorted(kwargs.items()) if _given(value))
            self.tally[key, "forward"] += 1
            with self.counter.pause():
                if key not in self.first_calls:
                    self.first_calls[key] = (op, _detached(args), _detached(kwargs))
                leaves = list({id(t): t for t in tensors if t.requires_grad}.values())
                if not leaves or not torch.is_grad_enabled():
                    return reference(*args, **kwargs)
                outputs = _OneNode.apply(self, key, reference, args, kwargs, *leaves)
            return outputs[0] if self.returned_tensor else outputs

        return run

    def launches_per_call(self) -> dict[str, tuple[int, int]]:
        """(forward, backward) launches of one call of each op (and layout) the backend ran,
        counted in a child process (Triton's interpreter must be on before its kernels are
        imported)."""
        if not self.first_calls:
            return {}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "calls.pt"
            calls = {
                key: (op, args, kwargs, self.grad_outputs.get(key))
                for key, (op, args, kwargs) in self.first_calls.items()
            }
            torch.save(calls, path)
            command = [sys.executable, "-m", "birkhoff.kernels.launch_counter"]
            done = subprocess.run(
                [*command, self.backend, str(path)],
                env=os.environ | {"TRITON_INTERPRET": "1"},
                capture_output=True,
                text=True,
            )
        lines = done.stdout.strip().splitlines()
        try:
            counts = json.loads(lines[-1]) if done.returncode == 0 and lines else None
        except json.JSONDecodeError:
            counts = None
        if counts is None:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RecipeError(
                "backend.kernels", self.backend,
                f"--launches could not count this backend's ops: {last}",
            )  # fmt: skip
        return {key: (forward, backward) for key, (forward, backward) in counts.items()}


class _OneNode(torch.autograd.Function):
    """The reference op as one autograd node, as a fused kernel is: its backward runs the
    reference's own backward inside (paused) and hands one gradient to each input, so the
    count outside sees no sums of partial gradients the reference's graph would make."""

    @staticmethod
    def forward(ctx, ops: CountedOps, key: str, reference, args, kwargs, *leaves):
        inner = {id(leaf): leaf.detach().requires_grad_() for leaf in leaves}
        with torch.enable_grad():
            out = reference(*_replaced(args, inner), **_replaced(kwargs, inner))
        single = isinstance(out, torch.Tensor)
        outs = (out,) if single else tuple(out)
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise TypeError(f"{key} returns {type(out).__name__}: counted ops return tensors")
        ctx.ops, ctx.key, ctx.inner, ctx.outs = ops, key, list(inner.values()), outs
        ctx.set_materialize_grads(False)
        ops.returned_tensor = single
        results = tuple(o.detach() for o in outs)
        constant = (r for r, o in zip(results, outs, strict=True) if not o.requires_grad)
        ctx.mark_non_differentiable(*constant)
        return results

    @staticmethod
    def backward(ctx, *grads):
        ops = ctx.ops
        ops.tally[ctx.key, "backward"] += 1
        # the first backward of the key's calls (the model's gradients reach every call alike)
        ops.grad_outputs.setdefault(ctx.key, [g is not None for g in grads])
        pairs = [
            (o, g)
            for o, g in zip(ctx.outs, grads, strict=True)
            if g is not None and o.requires_grad
        ]
        if not pairs:
            return (None,) * (5 + len(ctx.inner))
        with ops.counter.pause():
            found = torch.autograd.grad(
                [o for o, _ in pairs], ctx.inner, [g for _, g in pairs], allow_unused=True
            )
        return (None,) * 5 + tuple(found)


def swap_ops(model: nn.Module, replacements: dict[Callable, Callable]) -> None:
    """Replaces the op implementations `model`'s modules hold (looked up from the registry
    at construction) by those `replacements` maps them to."""
    for module in model.modules():
        for attr, value in list(vars(module).items()):
            if callable(value) and value in replacements:
                setattr(module, attr, replacements[value])


def charged(tally: Counter[tuple[str, str]], per_call: dict[str, tuple[int, int]]) -> int:
    """The launches of the tallied calls."""
    return sum(n * per_call[key][direction == "backward"] for (key, direction), n in tally.items())


def _replaced(value, tensors: dict[int, torch.Tensor]):
    """`value` with the tensors in `tensors` (by id) replaced."""
    return tree_map_only(torch.Tensor, lambda t: tensors.get(id(t), t), value)


def _detached(value):
    """`value` with every tensor copied, layout and all (strides and offset: an op's
    launches may depend on them, liger's ops copy strided inputs first); floating ones keep
    requires_grad."""
    return tree_map_only(torch.Tensor, _copied, value)


def _copied(tensor: torch.Tensor) -> torch.Tensor:
    storage = tensor.detach().untyped_storage().clone()
    copy = torch.empty(0, dtype=tensor.dtype)
    copy.set_(storage, tensor.storage_offset(), tensor.shape, tensor.stride())
    return copy.requires_grad_(tensor.requires_grad and copy.is_floating_point())
