"""`birkhoff doctor`'s kernel check: every op the chosen backend implements itself, run on
this device against the reference implementation (forward and every input gradient, relative
to the reference's largest value; the reference runs in float64 where its torch kernel allows,
the op in float32) and timed against it (forward and backward, the median of several runs).
An op a backend implements without an example here is itself a problem: the doctor must be
able to check it."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from birkhoff import kernels
from birkhoff.kernels.v4_attention import EntryKV
from birkhoff.launch.doctor_examples import (
    CONSTANT_ARGS,
    EXAMPLES,
    NO_BACKWARD,
    NO_CPU_BACKWARD,
    REFERENCE_DTYPE,
    example_calls,
)

TOLERANCE = 1e-4  # relative, float32 against float64
LIMITED_TOLERANCE = 1e-2  # an op limited to bfloat16: its outputs rounded to 8 bits
# (an op limited to float32 and wider types is held to TOLERANCE)
# An op may miss float64 by this many times the reference's own error in the op's precision
# (Engram's gate on an H200: 2.4e-3 where the float32 reference misses by 6e-4).
CONDITIONING_FACTOR = 10
RUNS = 5


def _tokens(device: torch.device, backend: str) -> int:
    """Tokens per example: a realistic batch on an accelerator; on the CPU a small model's
    micro-batch (the cpu backend's kernels are timed where their work, not their call, is the
    cost), and few for Triton, which runs interpreted there."""
    if device.type != "cpu":
        return 4096
    return 16 if backend == "triton" else 512


def check_kernels(backend: str, device: torch.device) -> dict:
    """The backend's own ops checked (none for the reference backend: it is the baseline)."""
    table = kernels.implementations(backend)
    own = [op for op, impl in table.items() if impl == backend and backend != "reference"]
    ops = {op: _check(op, backend, device) for op in own}
    return {"backend": backend, "summary": kernels.describe(backend), "ops": ops}


def _check(op: str, backend: str, device: torch.device) -> dict:
    result = {"implementation": backend, "ok": False, "problem": None}
    result |= {"forward_error": float("nan"), "backward_error": float("nan")}
    result["speed_ratio"] = float("nan")
    if op not in EXAMPLES:
        result["problem"] = "no example inputs in launch/doctor_examples.py to check it with"
        return result
    torch.manual_seed(0)
    inputs = [_to(a, device) for a in EXAMPLES[op](_tokens(device, backend))]
    limited = kernels.dtypes_of(op, backend)  # e.g. bfloat16 only: checked in it
    if limited:
        inputs = [cast_floating(a, limited[0]) for a in inputs]
    rounded = bool(limited) and limited[0].itemsize < 4  # below float32: outputs in 8 bits
    tolerance = LIMITED_TOLERANCE if rounded else TOLERANCE
    reference, fused = kernels.get(op, "reference"), kernels.get(op, backend)
    interpreted = device.type == "cpu" and backend == "triton"
    backward = not (interpreted and op in NO_CPU_BACKWARD) and op not in NO_BACKWARD
    exact_dtype = REFERENCE_DTYPE.get(op, torch.float64)
    constants = CONSTANT_ARGS.get(op, ())
    errors, own, half_calls = (0.0, 0.0), 0.0, []
    for args in example_calls(op, inputs):
        exact, exact_leaves = leaf_copies(args, exact_dtype, backward, constants)
        expected = as_tuple(reference(*exact))
        targets = [e for e in expected if e.requires_grad] if backward else []
        grads = [torch.randn_like(e) for e in targets]
        expected_grads = torch.autograd.grad(targets, exact_leaves, grads) if backward else ()
        call_errors = _errors(fused, args, expected, grads, expected_grads, constants)
        if not rounded and _below_float32(args):  # a further call in bfloat16, say
            half_calls.append(_worst(*call_errors))
            continue
        errors = tuple(map(_worst, errors, call_errors))
        if not rounded and exact_dtype == torch.float64:
            # The reference in the op's own precision: an ill-conditioned op (a gradient
            # through sqrt|s| near 0, say) misses float64 by as much, and the op is held to it.
            own = _worst(own, *_errors(reference, args, expected, grads, expected_grads, constants))
            result["reference_own_precision_error"] = own
            tolerance = max(tolerance, CONDITIONING_FACTOR * own)
    result["forward_error"], result["backward_error"] = errors
    notes = []
    if not backward:
        result["backward_error"] = float("nan")
        notes.append(f"forward only: {NO_BACKWARD.get(op) or NO_CPU_BACKWARD[op]}")
    if interpreted:  # Triton's interpreter runs the kernel in Python: its time says nothing
        notes.append("not timed: Triton's interpreter")
    else:
        timed = [_seconds(op_, inputs, device, backward, constants) for op_ in (reference, fused)]
        result["speed_ratio"] = timed[0] / timed[1]
    worst = _worst(*errors)
    result["ok"] = worst <= tolerance
    if half_calls:  # held to the rounding of their dtype, apart from the others
        half = result["half_precision_error"] = _worst(*half_calls)
        calls = f"{len(half_calls)} further call(s) in bfloat16 or float16"
        notes.append(f"{calls}, held to {LIMITED_TOLERANCE:g}: {half:.1e}")
        if result["ok"] and not half <= LIMITED_TOLERANCE:
            result["ok"], worst, tolerance = False, half, LIMITED_TOLERANCE
    if limited:
        notes.append(f"runs for {' or '.join(map(str, limited))} inputs only; checked in it")
    if notes:
        result["note"] = "; ".join(notes)
    if not result["ok"]:
        result["problem"] = f"relative error {worst:.1e} above {tolerance:g}"
    return result


def _below_float32(args: list) -> bool:
    """Whether a call's floating tensors (the entries' values too) are narrower than float32."""
    tensors = [a.values if isinstance(a, EntryKV) else a for a in args]
    return any(
        isinstance(t, torch.Tensor) and t.is_floating_point() and t.itemsize < 4 for t in tensors
    )


def _errors(
    op: Callable,
    inputs: list,
    expected: tuple,
    grads: list,
    expected_grads: tuple,
    constants: tuple[int, ...] = (),
) -> tuple[float, float]:
    """`op`'s relative forward and backward error on `inputs` (in their own dtype) against
    the expected outputs and input gradients (backward: 0 where `grads` is empty)."""
    args, leaves = leaf_copies(inputs, None, bool(grads), constants)
    got = as_tuple(op(*args))
    forward = max(map(_relative, got, expected))
    if not grads:
        return forward, 0.0
    pairs = [(o, e) for o, e in zip(got, expected, strict=True) if e.requires_grad]
    cast = [g.to(o.dtype) for g, (o, _) in zip(grads, pairs, strict=True)]
    got_grads = torch.autograd.grad([o for o, _ in pairs], leaves, cast)
    return forward, max(map(_relative, got_grads, expected_grads))


def _worst(*errors: float) -> float:
    """The largest error, NaN if any is (max() keeps whichever comes first of a number and
    NaN, so a NaN output could pass)."""
    return math.nan if any(map(math.isnan, errors)) else max(errors)


def as_tuple(result: torch.Tensor | tuple) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().clamp_min(1e-30)
    return ((got.double() - expected).abs().max() / scale).item()


def _to(arg: Any, device: torch.device) -> Any:
    return arg.to(device) if isinstance(arg, torch.Tensor) else arg


def cast_floating(arg: Any, dtype: torch.dtype) -> Any:
    floating = isinstance(arg, torch.Tensor) and arg.is_floating_point()
    return arg.to(dtype) if floating else arg


def leaf_copies(
    inputs: list, dtype: torch.dtype | None, grad: bool = True, constants: tuple[int, ...] = ()
) -> tuple[list, list[torch.Tensor]]:
    """Fresh copies of `inputs` whose floating tensors (in `dtype`, if given) take gradients
    (with `grad`, but for the positions in `constants`); and those tensors."""
    args = [
        (t.detach().to(dtype or t.dtype) if t.is_floating_point() else t)
        if isinstance(t, torch.Tensor)
        else t
        for t in inputs
    ]
    args = [_fresh_entries(a, dtype) if isinstance(a, EntryKV) else a for a in args]
    leaves = [
        a.requires_grad_(grad)
        for i, a in enumerate(args)
        if isinstance(a, torch.Tensor) and a.is_floating_point() and i not in constants
    ]
    leaves += [a.values.requires_grad_(grad) for a in args if isinstance(a, EntryKV)]
    return args, leaves


def _fresh_entries(entries: EntryKV, dtype: torch.dtype | None) -> EntryKV:
    """V4 attention's compressed entries with their values copied (in `dtype`, if given)."""
    values = entries.values.detach().to(dtype or entries.values.dtype)
    return EntryKV(values, entries.layout, entries.picks, entries.picked)


def _seconds(
    op: Callable,
    inputs: list,
    device: torch.device,
    backward: bool = True,
    constants: tuple[int, ...] = (),
) -> float:
    """Median seconds of a forward (and backward) of `op` on `inputs`."""
    args, _ = leaf_copies(inputs, None, backward, constants)
    times = []
    for _ in range(RUNS + 1):
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            outs = as_tuple(op(*args))
        if backward:  # ones, not sum(): F.grouped_mm refuses expanded gradients
            outs = [out for out in outs if out.requires_grad]
            torch.autograd.backward(outs, [torch.ones_like(out) for out in outs])
        if device.type != "cpu":
            torch.accelerator.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])
