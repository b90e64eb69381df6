"""The cpu backend's V4 attention core (kernels/cpu_v4_attention.c) against a per-query float64
loop written from the rules (window, documents, entries, sinks), the reference op in float64,
and, as a whole layer, transformers' DeepseekV4 attention."""

from __future__ import annotations

import pytest
import torch
from test_v4_attention import HIDDEN, assert_equals_transformers, pair

from birkhoff import kernels
from birkhoff.kernels import cpu_v4_attention
from birkhoff.kernels import v4_attention as reference
from birkhoff.model.compression import block_entries


def per_query(q, kv, positions, sinks, window, values, index):
    """out and lse one query at a time: its keys listed from the rules, one softmax over them
    and the sink (float64 in, float64 out, differentiable)."""
    batch, seq, heads, dim = q.shape
    outs, lses = [], []
    for b in range(batch):
        for t in range(seq):
            first = max(0, t - window + 1, t - int(positions[b, t]))
            keys = [kv[b, s] for s in range(first, t + 1)]
            keys += [values[b, e] for e in index[b, t].tolist() if e >= 0]
            keys = torch.stack(keys)  # (n, D)
            logits = torch.cat((q[b, t] @ keys.T * dim**-0.5, sinks[:, None]), dim=1)
            probs = torch.softmax(logits, dim=1)
            outs.append(probs[:, :-1] @ keys)
            lses.append(torch.logsumexp(logits, dim=1))
    return torch.stack(outs).view(q.shape), torch.stack(lses).view(batch, seq, heads)


def case(kind: str, heads: int, dim: int, window: int, lengths: list[int], seed: int = 0):
    """Inputs of one layer's attention core: documents of `lengths` packed in each of two rows,
    the entries a `kind` layer attends to (ratio 4; CSA: five picks, some not visible)."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].expand(2, -1).contiguous()
    seq = positions.shape[1]
    q = torch.randn(2, seq, heads, dim, generator=g)
    kv = torch.randn(2, seq, dim, generator=g)
    sinks = torch.randn(heads, generator=g)
    entries = None
    if kind != "sliding":
        layout = block_entries(positions, 4)
        values = torch.randn(2, layout.start.shape[1], dim, generator=g)
        entries = reference.EntryKV(values, layout)
        if kind == "csa":
            score = torch.randn(2, seq, values.shape[1], generator=g)
            top = score.masked_fill(~layout.visible(positions), -torch.inf).topk(5, dim=-1)
            entries = reference.EntryKV(values, layout, top.indices, torch.isfinite(top.values))
    return q, kv, positions, sinks, window, entries


def leaves(args, dtype):
    """Copies of the floating inputs in `dtype` taking gradients (the entries' values too)."""
    out, grads = [], []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(dtype).requires_grad_()
            grads.append(a)
        elif isinstance(a, reference.EntryKV):
            values = a.values.detach().to(dtype).requires_grad_()
            grads.append(values)
            a = reference.EntryKV(values, a.layout, a.picks, a.picked)
        out.append(a)
    return out, grads


def run(op, args, dtype, grad):
    inputs, grads = leaves(args, dtype)
    out, lse = op(*inputs)
    return out, lse, torch.autograd.grad(out, grads, grad.to(out.dtype))


def relative(got, exact):
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


CASES = {  # kind, heads, dim, window, document lengths
    "sliding": ("sliding", 5, 24, 16, [20, 25]),  # 5 heads: a group of four and one more
    "hca": ("hca", 4, 80, 8, [30, 17]),  # 80 channels: four vectors, one, no tail
    "csa": ("csa", 6, 64, 16, [50]),
    "window past the sequence": ("sliding", 3, 16, 64, [9, 11]),
    "one channel tail": ("csa", 2, 17, 4, [13, 20]),
}


@pytest.mark.parametrize("name", CASES)
def test_cpu_attention_equals_a_per_query_loop(name):
    """Output, normaliser and every input's gradient (queries, keys, entries, sinks) against
    the loop in float64, within twice the float32 reference's own error (at least 1e-5)."""
    assert_equals_the_loop("cpu", case(*CASES[name]))


def assert_equals_the_loop(
    backend: str, args: tuple, dtype: torch.dtype = torch.float32, floor: float = 1e-5
) -> None:
    """`backend`'s v4_attention on `args` in `dtype`: output (in `dtype`), normaliser
    (float32) and the gradients of queries, keys, sinks and entries within twice the
    reference's own error in `dtype` of the per-query loop in float64 (at least `floor`)."""
    q, kv, positions, sinks, window, entries = args
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    values, index = cpu_v4_attention.entry_lists(q, positions, entries)
    floating = [q, kv, sinks] + ([values] if entries is not None else [])
    exact_inputs, exact_leaves = leaves(floating, torch.float64)
    exact_q, exact_kv, exact_sinks, *exact_values = exact_inputs
    exact_values = exact_values[0] if exact_values else values.double()
    out, lse = per_query(exact_q, exact_kv, positions, exact_sinks, window, exact_values, index)
    exact = [out, lse, *torch.autograd.grad(out, exact_leaves, grad)]  # q, kv, sinks, values
    results = {}
    for name in ("reference", backend):
        got_out, got_lse, got_grads = run(kernels.get("v4_attention", name), args, dtype, grad)
        results[name] = [got_out, got_lse, *got_grads]
    assert not results[backend][1].requires_grad  # the normaliser: detached
    assert results[backend][0].dtype == dtype and results[backend][1].dtype == torch.float32
    for i, expected in enumerate(exact):
        own = relative(results["reference"][i], expected)
        error = relative(results[backend][i], expected)
        assert error <= max(2 * own, floor), (i, error, own)


def test_cpu_attention_in_bf16_rounds_as_the_reference():
    """bf16 queries and keys (autocast's): computed in float32, the output rounded once."""
    args = case("csa", 4, 32, 8, [40])
    grad = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(3))
    got = run(kernels.get("v4_attention", "cpu"), args, torch.bfloat16, grad)
    exact = run(reference.v4_attention, args, torch.float64, grad.double())
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for value, expected in zip((got[0], *got[2]), (exact[0], *exact[2]), strict=True):
        assert value.dtype == torch.bfloat16
        assert relative(value, expected) < 2**-7


def test_cpu_attention_gives_the_same_sums_on_one_thread_and_two():
    """The keys' gradients are summed per thread: another thread count sums in another order,
    within float32's rounding."""
    args = case("csa", 4, 32, 8, [40, 23])
    grad = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(run(kernels.get("v4_attention", "cpu"), args, torch.float32, grad))
    finally:
        torch.set_num_threads(threads)
    (out_1, lse_1, grads_1), (out_2, lse_2, grads_2) = results
    assert torch.equal(out_1, out_2) and torch.equal(lse_1, lse_2)  # one query per thread
    for one, two in zip(grads_1, grads_2, strict=True):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_type", ["sliding", "hca", "csa"])
def test_cpu_layer_equals_transformers_forward_and_backward(layer_type):
    """The whole layer on the cpu backend against transformers' (70 tokens: past the window)."""
    ours, theirs = pair(layer_type, seed=31, backend="cpu")
    x = torch.randn(2, 70, HIDDEN, generator=torch.Generator().manual_seed(32))
    assert_equals_transformers(ours, theirs, x)


def test_the_cpu_attention_op_is_a_well_formed_custom_op():
    """torch.library's checks: schema, fake against real, autograd, AOTAutograd tracing."""
    q, kv, positions, sinks, window, entries = case("csa", 3, 16, 4, [9, 11])
    values, index = cpu_v4_attention.entry_lists(q, positions, entries)
    args = [t.requires_grad_() for t in (q, kv, values)]
    torch.library.opcheck(
        cpu_v4_attention.v4_attention_op, (*args, index, positions, sinks.requires_grad_(), window)
    )


def test_cpu_attention_takes_what_the_reference_takes_at_the_edges():
    """int32 positions; a negative position (no window: its picks and the sink alone, as
    the reference allows); float32 inputs under autocast come back in autocast's dtype."""
    q, kv, positions, sinks, window, entries = case("csa", 2, 16, 4, [12, 12])
    positions = positions.clone()
    positions[0, 5] = -3
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    args = (q, kv, positions.int(), sinks, window, entries)
    exact = run(
        reference.v4_attention,
        (q, kv, positions, sinks, window, entries),
        torch.float64,
        grad.double(),
    )
    got = run(kernels.get("v4_attention", "cpu"), args, torch.float32, grad)
    for value, expected in zip(
        (got[0], got[1], *got[2]), (exact[0], exact[1], *exact[2]), strict=True
    ):
        assert relative(value, expected) < 1e-5
    sliding = (q, kv, positions.int(), sinks, window)
    run(kernels.get("v4_attention", "cpu"), sliding, torch.float32, grad)  # no entries
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = kernels.get("v4_attention", "cpu")(q, kv, positions, sinks, window, entries)
        expected, _ = reference.v4_attention(q, kv, positions, sinks, window, entries)
    assert out.dtype == expected.dtype == torch.bfloat16


def test_the_cpu_attention_op_refuses_entries_it_has_not_got():
    q, kv, positions, sinks, window, entries = case("csa", 2, 16, 4, [20])
    values, index = cpu_v4_attention.entry_lists(q, positions, entries)
    index = index.clone()
    index[0, 7, 0] = values.shape[1]
    with pytest.raises(RuntimeError, match="index: entries -1"):
        cpu_v4_attention.v4_attention_op(q, kv, values, index, positions, sinks, window)
