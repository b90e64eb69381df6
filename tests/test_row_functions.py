"""The reference ops' row functions with written-out backwards (kernels/row_functions.py)
against their formulas written out in float64 and differentiated by autograd, and the
reference ops that use them against the same formulas."""

from __future__ import annotations

import pytest
import torch

from birkhoff.kernels.reference import engram_gate, engram_gather_gate, rms_norm
from birkhoff.kernels.row_functions import gated_value, normalised_similarity, rms_norm_rows

EPS = 1e-6


def _rms_formula(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, grad_out)


def _close(ours, theirs, rtol=1e-10, atol=1e-12):
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [(5, 7, 3, 16), (9, 33), (1, 1)])
def test_rms_norm_rows_against_the_formula(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    weight = torch.randn(shape[-1], generator=g, dtype=torch.float64)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    ours, d_ours = _grads(lambda a, w: rms_norm_rows(a, w, EPS), (x, weight), grad)
    theirs, d_theirs = _grads(lambda a, w: _rms_formula(a, w, EPS), (x, weight), grad)
    _close((ours, *d_ours), (theirs, *d_theirs))
    # without a weight (V4's per-head query norm): the formula's weight is 1
    ours, d_ours = _grads(lambda a: rms_norm_rows(a, None, EPS), (x,), grad)
    theirs, d_theirs = _grads(lambda a: _rms_formula(a, 1.0, EPS), (x,), grad)
    _close((ours, *d_ours), (theirs, *d_theirs))
    # the registered op: float32 compute, the input's dtype out
    half = rms_norm(x.to(torch.bfloat16), weight.float(), EPS)
    assert half.dtype == torch.bfloat16
    expected = _rms_formula(x.to(torch.bfloat16).double(), weight.float().double(), EPS)
    torch.testing.assert_close(half.double(), expected, rtol=1e-2, atol=1e-2)


def test_normalised_similarity_against_the_formula():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 10, 4, 24, generator=g, dtype=torch.float64)
    k = torch.randn(6, 10, 4, 24, generator=g, dtype=torch.float64) * 0.1
    grad = torch.randn(6, 10, 4, generator=g, dtype=torch.float64)
    ones = torch.ones(24, dtype=torch.float64)

    def formula(a, b):
        return (_rms_formula(a, ones, EPS) * _rms_formula(b, ones, EPS)).sum(-1) / 24**0.5

    ours, d_ours = _grads(lambda a, b: normalised_similarity(a, b, EPS), (h, k), grad)
    theirs, d_theirs = _grads(formula, (h, k), grad)
    _close((ours, *d_ours), (theirs, *d_theirs))


def test_gated_value_against_the_broadcast_product():
    g = torch.Generator().manual_seed(2)
    alpha = torch.rand(3, 8, 4, generator=g, dtype=torch.float64)
    value = torch.randn(3, 8, 40, generator=g, dtype=torch.float64)
    grad = torch.randn(3, 8, 4, 40, generator=g, dtype=torch.float64)
    ours, d_ours = _grads(gated_value, (alpha, value), grad)
    theirs, d_theirs = _grads(lambda a, v: a.unsqueeze(-1) * v.unsqueeze(-2), (alpha, value), grad)
    _close((ours, *d_ours), (theirs, *d_theirs))


def test_engram_gather_gate_against_the_paper_formula():
    """The whole reference op in float64: alpha_m = sigmoid(signed_sqrt(<RMSNorm(h_m),
    RMSNorm(W_K^m e)> / sqrt(C))), alpha_m W_V e per stream; every input's gradient."""
    g = torch.Generator().manual_seed(3)
    rows, dim, heads, n, c = 50, 8, 4, 4, 16
    table = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    indices = torch.randint(0, rows, (2, 7, heads), generator=g)
    key_weight = torch.randn(n * c, heads * dim, generator=g, dtype=torch.float64) * 0.2
    value_weight = torch.randn(c, heads * dim, generator=g, dtype=torch.float64) * 0.2
    streams = torch.randn(2, 7, n, c, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 7, n, c, generator=g, dtype=torch.float64)
    ones = torch.ones(c, dtype=torch.float64)

    def formula(t, kw, vw, x):
        e = t[indices].flatten(-2)
        keys = (e @ kw.T).unflatten(-1, (n, c))
        s = (_rms_formula(x, ones, EPS) * _rms_formula(keys, ones, EPS)).sum(-1) / c**0.5
        alpha = torch.sigmoid(torch.sign(s) * torch.sqrt(s.abs().clamp_min(1e-6)))
        return alpha.unsqueeze(-1) * (e @ vw.T).unsqueeze(-2)

    def ours_fn(t, kw, vw, x):
        return engram_gather_gate(t, indices, kw, vw, x, EPS)

    inputs = (table, key_weight, value_weight, streams)
    ours, d_ours = _grads(ours_fn, inputs, grad)
    theirs, d_theirs = _grads(formula, inputs, grad)
    _close((ours, *d_ours), (theirs, *d_theirs))
    # the gate alone keeps float64 inputs in float64 (float32 at least, not float32 always)
    memory = table[indices].flatten(-2)
    assert engram_gate(memory, key_weight, streams, EPS).dtype == torch.float64


def test_compiled_code_traces_the_same_arithmetic():
    """Under torch.compile each function is plain arithmetic (no autograd.Function for
    inductor to treat as opaque); values and gradients still equal the formulas."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, 3, 16, generator=g, dtype=torch.float64)
    k = torch.randn(4, 6, 3, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(16, generator=g, dtype=torch.float64)
    alpha = torch.rand(4, 6, 3, generator=g, dtype=torch.float64)
    value = torch.randn(4, 6, 16, generator=g, dtype=torch.float64)
    ones = torch.ones(16, dtype=torch.float64)

    def ours(x, k, weight, alpha, value):
        normed = rms_norm_rows(x, weight, EPS)
        return normed.sum() + normalised_similarity(x, k, EPS).sum() + gated_value(alpha, value)

    def formula(x, k, weight, alpha, value):
        similarity = (_rms_formula(x, ones, EPS) * _rms_formula(k, ones, EPS)).sum(-1) / 4
        gated = alpha.unsqueeze(-1) * value.unsqueeze(-2)
        return _rms_formula(x, weight, EPS).sum() + similarity.sum() + gated

    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    inputs = (x, k, weight, alpha, value)
    grad = torch.randn(4, 6, 3, 16, generator=g, dtype=torch.float64)
    out, d_out = _grads(compiled, inputs, grad)
    expected, d_expected = _grads(formula, inputs, grad)
    _close((out, *d_out), (expected, *d_expected))
