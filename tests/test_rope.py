"""V4's interleaved RoPE on the trailing channels, op `rope_trailing`: the reference
(kernels/rotation.py, an autograd Function whose backward turns the gradient back), the cpu
backend's C pass (kernels/cpu_rows.c) and the triton backend's kernel (kernels/triton_rope.py,
interpreted here) against the rotation written as complex multiplication
in float64, forward and backward, eager and compiled."""

from __future__ import annotations

import pytest
import torch

from birkhoff import kernels
from birkhoff.kernels import cpu_rows
from birkhoff.kernels.rotation import rotate_trailing

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


# x's shape, the angles' shape: the model's (a token's angles for all its heads, or for its one
# KV entry), and broadcasts the C pass serves by expanding the tables (over the batch in front)
TABLE_SHAPES = [
    ((3, 5, 2, WIDTH), (3, 5, 1, PAIRS)),
    ((3, 5, WIDTH), (3, 5, PAIRS)),
    ((3, 5, WIDTH), (5, PAIRS)),
    ((3, 5, 2, WIDTH), (1, 5, 2, PAIRS)),
    ((4, 2 * PAIRS), (4, PAIRS)),  # every channel turned
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])  # triton: interpreted
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize(("shape", "table"), TABLE_SHAPES)
def test_the_rope_op_turns_as_the_formula_on_every_backend(backend, inverse, shape, table):
    """float32 in and out, against the float64 formula; `inverse` turns by minus the angles."""
    g = torch.Generator().manual_seed(1)
    x, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    angles = torch.randn(table, generator=g, dtype=torch.float64) * 3
    leaf = x.clone().requires_grad_()
    rope = kernels.get("rope_trailing", backend)
    out = rope(leaf, angles.cos().float(), angles.sin().float(), inverse=inverse)
    out.backward(grad)
    exact_x = x.double().requires_grad_()
    exact = _complex_formula(exact_x, -angles if inverse else angles)
    exact.backward(grad.double())
    assert out.dtype == leaf.grad.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-6)
    torch.testing.assert_close(leaf.grad.double(), exact_x.grad, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])  # triton: interpreted
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize(("shape", "table"), [TABLE_SHAPES[0], TABLE_SHAPES[1], TABLE_SHAPES[4]])
def test_the_rope_op_with_norm_eps_normalises_each_row_first(backend, inverse, shape, table):
    """`norm_eps` (V4's per-head query norm, no weight): each row x / sqrt(mean(x^2) + eps),
    then turned, against both written out in float64 (eps 0.5, large enough to see if it were
    dropped), forward and backward."""
    g = torch.Generator().manual_seed(2)
    x, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    angles = torch.randn(table, generator=g, dtype=torch.float64) * 3
    leaf = x.clone().requires_grad_()
    rope = kernels.get("rope_trailing", backend)
    out = rope(leaf, angles.cos().float(), angles.sin().float(), inverse=inverse, norm_eps=0.5)
    out.backward(grad)
    exact_x = x.double().requires_grad_()
    normed = exact_x / (exact_x.square().mean(-1, keepdim=True) + 0.5).sqrt()
    exact = _complex_formula(normed, -angles if inverse else angles)
    exact.backward(grad.double())
    assert out.dtype == leaf.grad.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-6)
    torch.testing.assert_close(leaf.grad.double(), exact_x.grad, rtol=0, atol=2e-6)


def test_the_cpu_normed_rope_op_is_a_well_formed_custom_op():
    x, angles, _ = _inputs(torch.float32)
    rows = x.reshape(-1, WIDTH).requires_grad_()
    tables = angles.reshape(-1, PAIRS).float()
    args = (rows, tables.cos(), tables.sin(), 2, False, 1e-6)
    torch.library.opcheck(cpu_rows.rope_normed_op, args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_fused_rope_in_bf16_rounds_once(backend):
    """The float32 turn rounds to the float64 one's (the interpreter rounds as the compiled
    kernel does: triton_interpreter's mend)."""
    x, angles, grad = _inputs()
    leaf = x.bfloat16().requires_grad_()
    cos, sin = angles.cos().float(), angles.sin().float()
    out = kernels.get("rope_trailing", backend)(leaf, cos, sin)
    out.backward(grad.bfloat16())
    exact = _complex_formula(x.bfloat16().double(), angles)
    assert out.dtype == leaf.grad.dtype == torch.bfloat16
    assert torch.equal(out, exact.bfloat16())
    torch.testing.assert_close(out, rotate_trailing(x.bfloat16(), cos, sin), rtol=0, atol=0)
    ones = torch.ones(x.shape, dtype=torch.float64, requires_grad=True)
    back = torch.autograd.grad(_complex_formula(ones, angles), ones, grad.bfloat16().double())
    torch.testing.assert_close(leaf.grad.double(), back[0], rtol=2**-8, atol=1e-6)


def test_the_triton_normed_rope_in_bf16_rounds_as_the_reference():
    """The normalised rows rounded to bf16 before the turn and the turned-back gradient
    before the norm's backward, as the reference's two ops hand them on: the same bits, both
    ways (the cpu kernel keeps both in float32: within a bf16 step of them)."""
    x, angles, grad = _inputs()
    cos, sin = angles.cos().float(), angles.sin().float()
    results = []
    for backend in ("reference", "triton"):
        leaf = x.bfloat16().requires_grad_()
        out = kernels.get("rope_trailing", backend)(leaf, cos, sin, norm_eps=0.5)
        out.backward(grad.bfloat16())
        results.append((out, leaf.grad))
    (out, d_x), (fused_out, fused_d_x) = results
    assert fused_out.dtype == fused_d_x.dtype == torch.bfloat16
    assert torch.equal(fused_out, out) and torch.equal(fused_d_x, d_x)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_fused_rope_refuses_tables_with_a_gradient(backend):
    x, angles, _ = _inputs(torch.float32)
    cos = angles.cos().float().requires_grad_()
    with pytest.raises(RuntimeError, match="gives no gradient to cos/sin"):
        kernels.get("rope_trailing", backend)(x, cos, angles.sin().float())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_fused_rope_takes_no_rows(backend):
    x = torch.empty(0, 4, WIDTH)
    table = torch.empty(0, 4, PAIRS)
    assert kernels.get("rope_trailing", backend)(x, table, table).shape == x.shape


@pytest.mark.parametrize("inverse", [False, True])
def test_the_cpu_rope_op_is_a_well_formed_custom_op(inverse):
    x, angles, _ = _inputs(torch.float32)
    rows = x.reshape(-1, WIDTH).requires_grad_()
    tables = angles.reshape(-1, PAIRS).float()
    args = (rows, tables.cos(), tables.sin(), 2, inverse)
    torch.library.opcheck(cpu_rows.rope_trailing_op, args)


@pytest.mark.parametrize("norm_eps", [None, 0.5])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_fused_rope_turns_a_strided_input_and_gradient(backend, norm_eps):
    """A transposed x and a transposed gradient (a compressor's backward hands one): read
    where they lie, turned (normalised first with `norm_eps`) as the formula."""
    x, angles, grad = _inputs(torch.float32)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    rope = kernels.get("rope_trailing", backend)
    out = rope(strided, angles.cos().float(), angles.sin().float(), norm_eps=norm_eps)
    out.backward(grad.transpose(0, 1).contiguous().transpose(0, 1))
    exact_x = x.double().requires_grad_()
    normed = exact_x
    if norm_eps is not None:
        normed = exact_x / (exact_x.square().mean(-1, keepdim=True) + norm_eps).sqrt()
    exact = _complex_formula(normed, angles)
    exact.backward(grad.double())
    torch.testing.assert_close(out.double(), exact.detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(strided.grad.double(), exact_x.grad, rtol=0, atol=2e-6)
