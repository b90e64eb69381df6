"""`birkhoff doctor`'s kernel check: every op the chosen backend implements itself, run on
this device against the reference implementation (forward and every input gradient, relative
to the reference's largest value; the reference runs in float64, the op in float32) and timed
against it (forward and backward, the median of several runs). An op a backend implements
without an example here is itself a problem: the doctor must be able to check it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from birkhoff import kernels

TOLERANCE = 1e-4  # relative, float32 against float64
RUNS = 5


def _tokens(device: torch.device) -> int:
    """Tokens per example: a realistic batch on an accelerator; few on the CPU, where Triton
    runs interpreted."""
    return 4096 if device.type != "cpu" else 16


def _mhc_pre(device: torch.device) -> list[torch.Tensor]:
    tokens = _tokens(device)
    return [torch.randn(tokens, 4, 512, device=device), torch.rand(tokens, 4, device=device)]


def _mhc_post(device: torch.device) -> list[torch.Tensor]:
    tokens = _tokens(device)
    streams, layer_out = torch.randn(tokens, 4, 512), torch.randn(tokens, 512)
    h_res, h_post = torch.rand(tokens, 4, 4), 2 * torch.rand(tokens, 4)
    return [t.to(device) for t in (streams, layer_out, h_res, h_post)]


# Inputs of each op a backend accelerates (float32, on the device).
EXAMPLES: dict[str, Callable[[torch.device], list[torch.Tensor]]] = {
    "mhc_pre": _mhc_pre,
    "mhc_post": _mhc_post,
}


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
    inputs = EXAMPLES[op](device)
    reference, fused = kernels.get(op, "reference"), kernels.get(op, backend)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    given = [t.detach().clone().requires_grad_() for t in inputs]
    expected, got = reference(*exact), fused(*given)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, exact, grad)
    got_grads = torch.autograd.grad(got, given, grad.to(got.dtype))
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


def _seconds(op: Callable, inputs: list[torch.Tensor], device: torch.device) -> float:
    """Median seconds of a forward and backward of `op` on `inputs`."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    times = []
    for _ in range(RUNS + 1):
        start = time.perf_counter()
        op(*leaves).sum().backward()
        if device.type != "cpu":
            torch.accelerator.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])
