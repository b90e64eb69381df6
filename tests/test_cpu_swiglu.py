"""The cpu backend's clamped SwiGLU (kernels/cpu_rows.c) and the triton backend's (liger's,
kernels/triton_swiglu.py with a clamp; interpreted) against its formula and derivatives
written out in float64, and against the reference at the clamp's edges."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from birkhoff import kernels
from birkhoff.kernels import cpu_rows, reference

# triton: liger's kernel without a limit, ours with one (interpreted), where liger is installed
BACKENDS = (
    ("reference", "cpu", "triton")
    if importlib.util.find_spec("liger_kernel")
    else ("reference", "cpu")
)


def written_out(gate, up, grad, limit):
    """out, d_gate, d_up of silu(min(g, L)) clamp(u, -L, L) in float64: the derivatives by
    hand, the clamp's passing where torch's clamp passes (g <= L, -L <= u <= L)."""
    g, u, grad = gate.double(), up.double(), grad.double()
    if limit is None:
        gc, uc, pass_g, pass_u = g, u, torch.ones_like(g), torch.ones_like(u)
    else:
        gc, uc = torch.where(g > limit, limit, g), torch.where(u > limit, limit, u)
        uc = torch.where(u < -limit, -limit, uc)
        pass_g, pass_u = (g <= limit).double(), ((u >= -limit) & (u <= limit)).double()
    s = 1 / (1 + torch.exp(-gc))
    out = gc * s * uc
    return out, grad * uc * s * (1 + gc * (1 - s)) * pass_g, grad * gc * s * pass_u


def inputs(shape, limit, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = 4 * torch.randn(shape, generator=g), 4 * torch.randn(shape, generator=g)
    if limit is not None:  # values on the clamp's edges
        gate.view(-1)[:3] = limit
        up.view(-1)[3:6] = limit
        up.view(-1)[6:9] = -limit
    return gate, up, torch.randn(shape, generator=g)


@pytest.mark.parametrize("limit", [None, 10.0, 1.5])
@pytest.mark.parametrize("shape", [(7,), (384, 128), (3, 5, 33)])
def test_cpu_swiglu_equals_its_formula(limit, shape):
    gate, up, grad = inputs(shape, limit)
    exact = written_out(gate, up, grad, limit)
    for backend in BACKENDS:
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out = kernels.get("swiglu", backend)(g, u, limit)
        out.backward(grad)
        for got, expected in zip((out, g.grad, u.grad), exact, strict=True):
            error = ((got.double() - expected).abs().max() / expected.abs().max()).item()
            assert error < 1e-6, (backend, error)


def test_cpu_swiglu_passes_nan_as_the_reference():
    """A NaN gate or up gives a NaN output; its gradient stops at the clamp as torch's does."""
    gate, up, grad = inputs((40,), 1.5, seed=1)
    gate[10], up[20] = float("nan"), float("nan")
    results = []
    for backend in BACKENDS:
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out = kernels.get("swiglu", backend)(g, u, 1.5)
        out.backward(grad)
        results.append((out, g.grad, u.grad))
    for result in results[1:]:
        for got, expected in zip(result, results[0], strict=True):
            torch.testing.assert_close(got, expected, equal_nan=True, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_cpu_swiglu_in_bf16_rounds_once(backend):
    """bf16 inputs (autocast's grouped GEMMs): computed in float32, rounded once."""
    gate, up, grad = inputs((64, 48), 10.0, seed=2)
    gate, up = gate.bfloat16(), up.bfloat16()
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = kernels.get("swiglu", backend)(g, u, 10.0)
    out.backward(grad.bfloat16())
    exact = written_out(gate, up, grad.bfloat16(), 10.0)
    for got, expected in zip((out, g.grad, u.grad), exact, strict=True):
        assert got.dtype == torch.bfloat16
        assert ((got.double() - expected).abs() <= 2**-8 * expected.abs() + 1e-6).all()


@pytest.mark.parametrize("limit", [None, 10.0])
def test_the_cpu_swiglu_op_is_a_well_formed_custom_op(limit):
    gate, up, _ = inputs((19, 24), limit, seed=3)
    torch.library.opcheck(cpu_rows.swiglu_op, (gate.requires_grad_(), up.requires_grad_(), limit))


def test_the_reference_swiglu_is_the_one_the_cpu_backend_replaces():
    assert kernels.get("swiglu", "reference") is reference.swiglu
    assert kernels.implementations("cpu", torch.float32)["swiglu"] == "cpu"


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_cpu_swiglu_promotes_mixed_dtypes_as_the_reference(backend):
    gate, up, _ = inputs((8, 16), 10.0, seed=4)
    got = kernels.get("swiglu", backend)(gate.bfloat16(), up, 10.0)
    assert got.dtype == reference.swiglu(gate.bfloat16(), up, 10.0).dtype == torch.float32
