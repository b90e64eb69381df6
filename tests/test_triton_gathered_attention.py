"""The triton backend's attention over CSA's gathered picks (kernels/triton_gathered_attention.py,
under TRITON_INTERPRET=1) against a per-query float64 loop over each query's visible picks:
output, log-sum-exp and the gradients of queries and entries through both; then the whole
triton V4 attention (the window's FlexAttention call merged with it) against the per-query
loop of the other backends' tests and a CSA layer against transformers' DeepseekV4 attention,
with the picks gathered."""

from __future__ import annotations

import pytest
import torch
from test_cpu_v4_attention import assert_equals_the_loop, case
from test_v4_attention import HIDDEN, assert_equals_transformers, force_csa_form, pair

from birkhoff.kernels import flex_v4_attention
from birkhoff.kernels import v4_attention as reference
from birkhoff.kernels.triton_gathered_attention import gathered_entry_attention


@pytest.fixture
def kernel_calls(monkeypatch) -> list:
    """The gathered kernel's calls from the triton V4 attention, recorded."""
    calls = []

    def recorded(*args):
        calls.append(args[2].shape)  # the picks
        return gathered_entry_attention(*args)

    monkeypatch.setattr(flex_v4_attention, "gathered_entry_attention", recorded)
    return calls


def picked_loop(q, values, picks, picked):
    """Each query's softmax over its visible picks, one query at a time (float64): out and
    log-sum-exp (0 and -inf where it picked nothing visible)."""
    batch, seq, heads, dim = q.shape
    outs, lses = [], []
    for b in range(batch):
        for t in range(seq):
            chosen = [values[b, e] for e, ok in zip(picks[b, t], picked[b, t], strict=True) if ok]
            if not chosen:
                outs.append(q.new_zeros(heads, dim))
                lses.append(q.new_full((heads,), -torch.inf))
                continue
            rows = torch.stack(chosen)
            logits = q[b, t] @ rows.T * dim**-0.5
            outs.append(torch.softmax(logits, -1) @ rows)
            lses.append(torch.logsumexp(logits, -1))
    return torch.stack(outs).view(q.shape), torch.stack(lses).view(batch, seq, heads)


def relative(got: torch.Tensor, exact: torch.Tensor) -> float:
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(got), finite)
    got, exact = got.double()[finite], exact[finite]
    return ((got - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
def test_the_kernel_equals_a_per_query_loop(dtype, bound):
    """20 heads (a block of 16 and 4 more), 24 channels (padded to 32), 21 picks of 40
    entries (a block of 16 and one of 5, the softmax carried across), some not visible and
    one query with none: output,
    log-sum-exp and the gradients of queries and entries, gradients arriving through both
    outputs, within float32's rounding or bf16's."""
    g = torch.Generator().manual_seed(0)
    batch, seq, heads, dim, count, k = 2, 9, 20, 24, 40, 21
    q = torch.randn(batch, seq, heads, dim, generator=g, dtype=torch.float64)
    values = torch.randn(batch, count, dim, generator=g, dtype=torch.float64)
    picks = torch.stack([torch.randperm(count, generator=g)[:k] for _ in range(batch * seq)])
    picks = picks.view(batch, seq, k)
    picked = torch.rand(batch, seq, k, generator=g) > 0.3
    picked[0, 0] = False
    d_out = torch.randn(q.shape, generator=g, dtype=torch.float64)
    d_lse = torch.randn(batch, seq, heads, generator=g, dtype=torch.float64)

    def run(op, q, values):
        q, values = q.detach().requires_grad_(), values.detach().requires_grad_()
        out, lse = op(q, values, picks, picked)
        finite = torch.where(torch.isfinite(lse), lse, 0.0)
        total = (out.double() * d_out).sum() + (finite.double() * d_lse).sum()
        return [out, lse, *torch.autograd.grad(total, (q, values))]

    exact = run(picked_loop, q, values)
    got = run(gathered_entry_attention, q.to(dtype), values.to(dtype))
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert torch.equal(got[0][0, 0], torch.zeros(heads, dim, dtype=dtype))
    for i, (value, expected) in enumerate(zip(got, exact, strict=True)):
        assert relative(value, expected) <= bound, (i, relative(value, expected))


def test_the_triton_attention_gathering_picks_equals_a_per_query_loop(
    unfused_flex_with_gradients, kernel_calls, monkeypatch
):
    """The triton backend's V4 attention with CSA's picks gathered (forced: at this shape the
    rule would mask): the window's FlexAttention call and the picks' kernel merged with the
    sink, within twice the float32 reference's own error of the loop."""
    monkeypatch.setattr(reference, "picks_as_mask", lambda *_: False)
    assert_equals_the_loop("triton", case("csa", 6, 64, 16, [30, 29]))
    assert kernel_calls == [(2, 59, 5)]


def test_a_csa_layer_gathering_picks_on_triton_equals_transformers(
    unfused_flex_with_gradients, kernel_calls, monkeypatch
):
    """48 tokens (past the window; every program of the interpreted kernel costs), picks
    gathered: output, input and every parameter gradient as transformers' DeepseekV4
    attention."""
    force_csa_form(monkeypatch, "gather")
    ours, theirs = pair("csa", seed=21, backend="triton")
    x = torch.randn(2, 48, HIDDEN, generator=torch.Generator().manual_seed(22))
    assert_equals_transformers(ours, theirs, x)
    assert len(kernel_calls) == 1


def test_deterministic_algorithms_keep_flex_attention_for_the_picks(
    unfused_flex_with_gradients, kernel_calls, monkeypatch
):
    """Under torch's deterministic algorithms (train.deterministic) the kernel, whose backward
    adds atomically, is not used: the picks go through FlexAttention's call, still equal to
    the loop."""
    monkeypatch.setattr(reference, "picks_as_mask", lambda *_: False)
    torch.use_deterministic_algorithms(True)
    try:
        assert_equals_the_loop("triton", case("csa", 6, 64, 16, [30, 29]))
    finally:
        torch.use_deterministic_algorithms(False)
    assert kernel_calls == []
