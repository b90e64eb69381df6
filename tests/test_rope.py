"""V4's interleaved RoPE on the trailing channels (model/rope.py: an autograd Function whose
backward turns the gradient back) against the rotation written as complex multiplication
in float64, forward and backward, eager and compiled."""

from __future__ import annotations

import pytest
import torch

from birkhoff.model.rope import rotate_trailing

PAIRS, WIDTH = 4, 11  # 8 rotated channels of 11: 3 pass


def _complex_formula(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """(x_2i + i x_2i+1) e^(i angle_i) on the last 2 * PAIRS channels; the others as they are."""
    tail = torch.view_as_complex(x[..., -2 * PAIRS :].unflatten(-1, (-1, 2)).contiguous())
    turned = torch.view_as_real(tail * torch.polar(torch.ones_like(angles), angles))
    return torch.cat((x[..., : -2 * PAIRS], turned.flatten(-2)), dim=-1)


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 2, WIDTH, generator=g, dtype=torch.float64).to(dtype)
    angles = torch.randn(3, 5, 1, PAIRS, generator=g, dtype=torch.float64) * 3
    grad = torch.randn(3, 5, 2, WIDTH, generator=g, dtype=torch.float64).to(dtype)
    return x, angles, grad


@pytest.mark.parametrize("compiled", [False, True])
def test_rotation_and_its_gradient_equal_complex_multiplication(compiled):
    x, angles, grad = _inputs()
    fn = rotate_trailing
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(rotate_trailing, backend="aot_eager", fullgraph=True)
    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = fn(ours_x, angles.cos(), angles.sin())
    theirs = _complex_formula(theirs_x, angles)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours.backward(grad)
    theirs.backward(grad)
    torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=1e-12, atol=1e-12)


def test_a_broadcast_gradient_and_bf16_inputs():
    """The gradient of a sum arrives expanded (stride 0); bf16 inputs turn in float32 and
    come back in bf16, as the expression did."""
    x, angles, _ = _inputs(torch.bfloat16)
    leaf = x.clone().requires_grad_()
    out = rotate_trailing(leaf, angles.float().cos(), angles.float().sin())
    assert out.dtype == torch.bfloat16
    expected = _complex_formula(x.double(), angles)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=2e-2)
    out.sum().backward()
    ones = torch.ones(x.shape, dtype=torch.float64, requires_grad=True)
    turned_back = torch.autograd.grad(_complex_formula(ones, angles), ones, torch.ones_like(ones))
    torch.testing.assert_close(leaf.grad.double(), turned_back[0], rtol=1e-2, atol=2e-2)


def test_views_at_an_odd_offset_turn_as_the_formula():
    """Inputs and gradients that are views starting at an odd element (a complex view needs
    its pairs at an even offset): the rotation and its gradient as the formula gives them."""
    x, angles, grad = (t[..., -2 * PAIRS :].contiguous() for t in _inputs())  # all turned
    odd = torch.randn(1 + x.numel(), dtype=torch.float64)[1:].view(x.shape).copy_(x)
    odd_grad = torch.randn(1 + grad.numel(), dtype=torch.float64)[1:].view(grad.shape)
    odd_grad.copy_(grad)
    leaf = odd.requires_grad_()
    out = rotate_trailing(leaf, angles.cos(), angles.sin())
    torch.testing.assert_close(out, _complex_formula(x, angles), rtol=1e-12, atol=1e-12)
    out.backward(odd_grad)
    exact = x.clone().requires_grad_()
    _complex_formula(exact, angles).backward(grad)
    torch.testing.assert_close(leaf.grad, exact.grad, rtol=1e-12, atol=1e-12)
