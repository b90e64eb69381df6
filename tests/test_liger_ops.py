"""The triton backend's RMSNorm, SwiGLU and RoPE, taken from liger-kernel (kernels/liger_ops.py),
against the reference ops run in float64: forward and every differentiated input's gradient,
in float32 and in bf16, with the argument layouts the model passes. liger's kernels run under
Triton's interpreter here, adapted to pass floats as compiled Triton does
(kernels/triton_interpreter.py); tests/test_triton_build.py compiles the same kernels for sm_90."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("liger_kernel")

from birkhoff.kernels import liger_ops, reference


def compare(op_ref, op_new, inputs: list, differentiated: list[int], dtype: torch.dtype):
    """op_new on `inputs` in `dtype` against op_ref on float64 copies of the same values; the
    gradients of the inputs at positions `differentiated`. Tolerances: a few roundings of
    `dtype`. Returns copies of op_new's tensor arguments taken before the call, and them."""
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}

    # differentiated inputs in `dtype`, the rest (RoPE's tables) float32, as the model has them
    rounded = [a.to(dtype) if i in differentiated else a for i, a in enumerate(inputs)]

    def copies(kind: torch.dtype) -> tuple[list, list]:  # both from the values in `dtype`
        args = [a.detach().to(kind) if i in differentiated else a for i, a in enumerate(rounded)]
        leaves = [args[i].requires_grad_() for i in differentiated]
        return args, leaves

    (exact, exact_leaves), (given, leaves) = copies(torch.float64), copies(dtype)
    kept = [a.clone() for a in given if isinstance(a, torch.Tensor)]
    expected, got = op_ref(*exact), op_new(*given)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, **tol)
    grads = [torch.randn_like(e) for e in expected]
    expected_grads = torch.autograd.grad(expected, exact_leaves, grads)
    got_grads = torch.autograd.grad(got, leaves, [g.to(dtype) for g in grads])
    for i, e, g in zip(differentiated, expected_grads, got_grads, strict=True):
        assert g.dtype == dtype, i
        torch.testing.assert_close(g.double(), e, **tol, msg=lambda m, i=i: f"input {i}: {m}")
    return kept, [a for a in given if isinstance(a, torch.Tensor)]


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 200])  # 200: a block of 256 with a masked tail
def test_liger_rms_norm_matches_the_reference(dtype, width):
    torch.manual_seed(width)
    x, weight = 3 * torch.randn(2, 5, width), torch.rand(width) + 0.5
    compare(reference.rms_norm, liger_ops.rms_norm, [x, weight, 1e-6], [0, 1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("limit", [None, 10.0])  # V4's clamp, beyond which the inputs reach
def test_liger_swiglu_matches_the_reference(dtype, limit):
    torch.manual_seed(1)
    gate, up = 8 * torch.randn(6, 48), 8 * torch.randn(6, 48)
    compare(reference.swiglu, liger_ops.swiglu, [gate, up, limit], [0, 1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sequence", [False, True])  # (T, D/2) or packed (B, T, D/2)
def test_liger_rope_rotates_queries_and_keys_as_the_reference(dtype, per_sequence):
    """Grouped keys (fewer heads than queries, and not a power of 2); the tables are buffers
    (not differentiated); neither the inputs nor the gradients handed in are written."""
    torch.manual_seed(2)
    batch, seq, dim = 2, 7, 32
    angles = 6 * torch.rand((batch, seq, dim // 2) if per_sequence else (seq, dim // 2))
    q, k = torch.randn(batch, seq, 6, dim), torch.randn(batch, seq, 3, dim)
    inputs = [q, k, angles.cos(), angles.sin()]
    kept, given = compare(reference.rope, liger_ops.rope, inputs, [0, 1], dtype)
    for before, after in zip(kept, given, strict=True):
        assert torch.equal(before, after)


def test_liger_rope_takes_the_model_s_layouts():
    """The attention hands (B, T, H, D) views of its projections in and gets its gradients
    back transposed from (B, H, T, D): a non-contiguous gradient, not written either."""
    torch.manual_seed(3)
    angles = 6 * torch.rand(5, 8)
    cos, sin = angles.cos(), angles.sin()
    projected = torch.randn(2, 5, 4 * 16, requires_grad=True)
    q, k = projected.view(2, 5, 4, 16), projected.view(2, 5, 4, 16).flip(2)
    got = liger_ops.rope(q, k, cos, sin)
    expected = reference.rope(q, k, cos, sin)
    grads = [torch.randn(2, 4, 5, 16).transpose(1, 2) for _ in range(2)]  # non-contiguous
    kept = [g.clone() for g in grads]
    got_grad = torch.autograd.grad(got, projected, grads)[0]
    expected_grad = torch.autograd.grad(expected, projected, grads)[0]
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(got_grad, expected_grad)
    assert all(torch.equal(a, b) for a, b in zip(kept, grads, strict=True))


def test_liger_rms_norm_takes_bf16_inputs_with_a_float32_weight():
    """Under autocast the model's norms see bf16 activations and a float32 weight: bf16 out and
    input gradient, a float32 weight gradient, each as the float64 reference within rounding."""
    torch.manual_seed(4)
    x = (3 * torch.randn(4, 5, 96)).bfloat16().requires_grad_()
    weight = (torch.rand(96) + 0.5).requires_grad_()
    out = liger_ops.rms_norm(x, weight, 1e-6)
    grad = torch.randn_like(out)
    dx, dw = torch.autograd.grad(out, (x, weight), grad)
    exact = [t.detach().double().requires_grad_() for t in (x, weight)]
    expected = reference.rms_norm(*exact, 1e-6)
    dx_exact, dw_exact = torch.autograd.grad(expected, exact, grad.double())
    assert (out.dtype, dx.dtype, dw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx.double(), dx_exact, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw.double(), dw_exact, rtol=1e-5, atol=1e-5)
