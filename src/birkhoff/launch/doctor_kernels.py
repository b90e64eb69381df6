"""`birkhoff doctor`'s kernel check: every op the chosen backend implements itself, run on
this device against the reference implementation (forward and every input gradient, relative
to the reference's largest value; the reference runs in float64 where its torch kernel allows,
the op in float32) and timed against it (forward and backward, the median of several runs).
An op a backend implements without an example here is itself a problem: the doctor must be
able to check it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from birkhoff import kernels

TOLERANCE = 1e-4  # relative, float32 against float64
RUNS = 5


def _tokens(device: torch.device) -> int:
    """Tokens per example: a realistic batch on an accelerator; few on the CPU, where Triton
    runs interpreted."""
    return 4096 if device.type != "cpu" else 16


def _mhc_pre(tokens: int) -> list:
    return [torch.randn(tokens, 4, 512), torch.rand(tokens, 4)]


def _mhc_post(tokens: int) -> list:
    streams, layer_out = torch.randn(tokens, 4, 512), torch.randn(tokens, 512)
    return [streams, layer_out, torch.rand(tokens, 4, 4), 2 * torch.rand(tokens, 4)]


def _rms_norm(tokens: int) -> list:
    return [torch.randn(tokens, 1024), torch.rand(1024) + 0.5, 1e-6]


def _rope(tokens: int) -> list:
    angles = torch.rand(tokens, 32) * 6  # (T, D/2)
    return [torch.randn(1, tokens, 8, 64), angles.cos(), angles.sin()]


def _attention(tokens: int) -> list:
    heads, kv_heads = 8, 2  # (B, H, T, D), grouped key/value heads
    return [torch.randn(1, heads, tokens, 64), *(torch.randn(1, kv_heads, tokens, 64),) * 2]


def _grouped_gemm(tokens: int) -> list:
    experts = 8
    counts = torch.full((experts,), tokens // experts)
    counts[-1] += tokens - counts.sum()  # every row in a group
    return [torch.randn(tokens, 256), torch.randn(experts, 256, 128) / 16, counts]


def _swiglu(tokens: int) -> list:
    return [4 * torch.randn(tokens, 1024), 4 * torch.randn(tokens, 1024), 10.0]  # V4's clamp


# Inputs of each op a backend accelerates (float32; tensors moved to the device; floating
# tensors are differentiated, other arguments passed as they are).
EXAMPLES: dict[str, Callable[[int], list]] = {
    "mhc_pre": _mhc_pre,
    "mhc_post": _mhc_post,
    "rms_norm": _rms_norm,
    "rope": _rope,
    "attention": _attention,
    "grouped_gemm": _grouped_gemm,
    "swiglu": _swiglu,
}
# The reference runs in float64 but for ops whose torch kernel has none (F.grouped_mm).
REFERENCE_DTYPE = {"grouped_gemm": torch.float32}


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
        result["problem"] = "no example inputs in launch/doctor_kernels.py to check it with"
        return result
    torch.manual_seed(0)
    inputs = [_to(a, device) for a in EXAMPLES[op](_tokens(device))]
    reference, fused = kernels.get(op, "reference"), kernels.get(op, backend)
    exact, exact_leaves = _leaves(inputs, REFERENCE_DTYPE.get(op, torch.float64))
    given, given_leaves = _leaves(inputs, None)
    expected, got = reference(*exact), fused(*given)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, exact_leaves, grad)
    got_grads = torch.autograd.grad(got, given_leaves, grad.to(got.dtype))
    result["forward_error"] = _relative(got, expected)
    result["backward_error"] = max(map(_relative, got_grads, expected_grads))
    result["speed_ratio"] = _seconds(reference, inputs, device) / _seconds(fused, inputs, device)
    worst = max(result["forward_error"], result["backward_error"])
    result["ok"] = worst <= TOLERANCE
    if not result["ok"]:
        result["problem"] = f"relative error {worst:.1e} above {TOLERANCE:g}"
    return result


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().clamp_min(1e-30)
    return ((got.double() - expected).abs().max() / scale).item()


def _to(arg: Any, device: torch.device) -> Any:
    return arg.to(device) if isinstance(arg, torch.Tensor) else arg


def _leaves(inputs: list, dtype: torch.dtype | None) -> tuple[list, list[torch.Tensor]]:
    """Fresh copies of `inputs` whose floating tensors (in `dtype`, if given) take gradients;
    and those tensors."""
    args = [
        (t.detach().to(dtype or t.dtype).requires_grad_() if t.is_floating_point() else t)
        if isinstance(t, torch.Tensor)
        else t
        for t in inputs
    ]
    return args, [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _seconds(op: Callable, inputs: list, device: torch.device) -> float:
    """Median seconds of a forward and backward of `op` on `inputs`."""
    args, _ = _leaves(inputs, None)
    times = []
    for _ in range(RUNS + 1):
        start = time.perf_counter()
        out = op(*args)
        out.backward(torch.ones_like(out))  # not sum(): F.grouped_mm refuses expanded grads
        if device.type != "cpu":
            torch.accelerator.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])
