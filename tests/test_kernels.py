"""Kernel backends: every non-reference op against the reference forward and backward (a
float64 reference run of the same inputs), which implementation runs for each backend (the
fallbacks listed, never silent), how `backend.kernels` resolves per device, and a model built
with the Triton kernels against the same model with the reference ones. Triton runs under its
interpreter here (TRITON_INTERPRET=1, set in conftest.py where no GPU is visible)."""

from __future__ import annotations

import pytest
import torch

from birkhoff import kernels
from birkhoff.errors import RecipeError
from birkhoff.kernels import (
    reference,
    triton_mhc,  # triton is a dev dependency: no skip
    triton_sinkhorn,
)
from conftest import assert_backend_trains_as_reference

# float32 kernels against the float64 reference: sums over n streams and C channels
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
SHAPES = [(4, 64), (3, 200), (1, 17)]  # (streams, channels): n not a power of 2, C > block


def compare(op_ref, op_new, inputs: list[torch.Tensor]) -> None:
    """Forward and every input gradient of op_new (float32) against op_ref in float64."""
    exact = [t.detach().double().requires_grad_() for t in inputs]
    given = [t.detach().clone().requires_grad_() for t in inputs]
    expected, got = op_ref(*exact), op_new(*given)
    assert got.dtype == inputs[0].dtype
    torch.testing.assert_close(got.double(), expected, **TOLERANCE)
    grad = torch.randn(expected.shape, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, exact, grad)
    got_grads = torch.autograd.grad(got, given, grad.to(got.dtype))
    for i, (tensor, e, g) in enumerate(zip(given, expected_grads, got_grads, strict=True)):
        assert g.dtype == tensor.dtype, i
        torch.testing.assert_close(g.double(), e, **TOLERANCE, msg=lambda m, i=i: f"input {i}: {m}")


@pytest.mark.parametrize(("n", "c"), SHAPES)
def test_triton_mhc_pre_matches_the_reference(n, c):
    torch.manual_seed(n * c)
    streams, h_pre = torch.randn(2, 5, n, c), torch.rand(2, 5, n)
    compare(reference.mhc_pre, triton_mhc.mhc_pre, [streams, h_pre])


@pytest.mark.parametrize(("n", "c"), SHAPES)
def test_triton_mhc_post_matches_the_reference(n, c):
    torch.manual_seed(n * c + 1)
    streams, layer_out = torch.randn(2, 5, n, c), torch.randn(2, 5, c)
    h_res, h_post = torch.rand(2, 5, n, n), 2 * torch.rand(2, 5, n)
    compare(reference.mhc_post, triton_mhc.mhc_post, [streams, layer_out, h_res, h_post])


@pytest.mark.parametrize("form", ["sinkhorn_knopp", "sinkhorn_knopp_eps"])
@pytest.mark.parametrize(("n", "tokens", "iters"), [(4, 37, 20), (3, 5, 20), (4, 3, 1)])
def test_triton_sinkhorn_matches_the_reference(form, n, tokens, iters):
    """Sinkhorn-Knopp in log space and in V4's linear form with eps, forward and the
    recomputing backward; 37 matrices fill a block of 32 and part of the next, n = 3 pads
    to 4 (a padded row's divisor is eps: a leak there grows 1e6 a step)."""
    torch.manual_seed(n * tokens)
    logits = 2 * torch.randn(tokens, n, n)  # far from doubly stochastic at the start
    extra = (iters,) if form == "sinkhorn_knopp" else (iters, 1e-6)

    def with_args(op):
        return lambda x: op(x, *extra)

    ops = getattr(reference, form), getattr(triton_sinkhorn, form)
    compare(*map(with_args, ops), [logits])


def test_triton_mhc_keeps_the_dtypes_under_autocast():
    """A bf16 sublayer output merges into float32 streams (the reference disables autocast
    there); the stream read returns autocast's dtype, as the reference's matmul does."""
    streams, layer_out = torch.randn(2, 3, 4, 32), torch.randn(2, 3, 32).bfloat16()
    h_res, h_post = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merged = triton_mhc.mhc_post(streams, layer_out, h_res, h_post)
        expected = reference.mhc_post(streams, layer_out, h_res, h_post)
        read = triton_mhc.mhc_pre(streams, h_post)
        assert read.dtype == reference.mhc_pre(streams, h_post).dtype == torch.bfloat16
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


def test_every_backend_says_which_implementation_runs():
    table = kernels.implementations("triton")
    assert set(table) == set(kernels.ops())
    own = {"mhc_pre", "mhc_post", "sinkhorn_knopp", "sinkhorn_knopp_eps", "v4_attention"}
    assert {op for op, impl in table.items() if impl == "triton"} == own
    assert kernels.fallbacks("triton") == sorted(set(table) - own)
    assert kernels.fallbacks("reference") == []
    with pytest.raises(ValueError, match="'auto': not one of reference, triton, npu"):
        kernels.get("rms_norm", "auto")  # resolved per device before any model is built
    line = kernels.describe("triton")
    assert f"triton for 5 of {len(table)} ops (mhc_post, mhc_pre, sinkhorn_knopp," in line
    assert f"{len(table) - 5} fall back to reference: attention" in line


def test_kernel_backend_resolves_per_device(monkeypatch):
    assert kernels.backend_for("auto", "cpu") == "reference"
    assert kernels.backend_for("auto", "cuda") == "triton"
    assert kernels.backend_for("auto", None) == "reference"  # a dry run builds no kernels
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RecipeError, match=r"needs a CUDA device \(this rank runs on cpu"):
        kernels.backend_for("triton", "cpu")
    assert kernels.backend_for("triton", "cuda") == "triton"
    with pytest.raises(RecipeError, match="its package does not import here; install"):
        kernels.backend_for("npu", "npu")


def test_a_model_with_triton_kernels_trains_as_the_reference_one():
    assert_backend_trains_as_reference("triton")
