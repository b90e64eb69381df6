"""V4 attention on the `npu` backend (kernels/npu_v4_attention.py) through a stand-in torch_npu
whose npu_fusion_attention_v2 computes its documented formula, sink included
(tests/npu_stand_in.py): output, normaliser and every input's gradient (queries, keys, entries,
sinks) against a per-query float64 loop written from the rules (tests/test_cpu_v4_attention.py),
for a sliding-window, an HCA and a CSA layer with documents packed, and each whole layer against
transformers' DeepseekV4 attention; the calls the operator does not take run the reference. The
call's signature is checked against the wheel's docs in test_npu_backend.py."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from npu_stand_in import StandIn
from test_cpu_v4_attention import (
    CASES,
    assert_equals_the_loop,
    case,
    relative,
    run,
)
from test_v4_attention import HIDDEN, assert_equals_transformers, force_csa_form, pair

from birkhoff import kernels
from birkhoff.kernels import npu_v4_attention
from birkhoff.kernels import v4_attention as reference
from conftest import assert_backend_trains_as_reference, assert_bf16_trains_as_reference


@pytest.mark.parametrize("name", CASES)
def test_npu_attention_equals_a_per_query_loop(stand_in, name):
    """Within twice the float32 reference's own error of the loop (at least 1e-5), in one
    operator call."""
    assert_equals_the_loop("npu", case(*CASES[name]))
    assert stand_in.calls == ["npu_fusion_attention_v2"]


def test_npu_attention_in_bf16_rounds_as_the_reference(stand_in, monkeypatch):
    """bf16 queries and keys (autocast's): the output and gradients in bf16 within its
    rounding of the float64 reference, the normaliser float32 (the sinks' gradient summed
    three rows at a time)."""
    monkeypatch.setattr(npu_v4_attention, "DOT_FLOATS", 100)  # 3 rows of 32 channels
    args = case("csa", 4, 32, 8, [40])
    grad = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(3))
    got = run(kernels.get("v4_attention", "npu"), args, torch.bfloat16, grad)
    exact = run(reference.v4_attention, args, torch.float64, grad.double())
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert relative(got[1], exact[1]) < 2**-7  # from the inputs' rounding
    for value, expected in zip((got[0], *got[2]), (exact[0], *exact[2]), strict=True):
        assert value.dtype == torch.bfloat16
        assert relative(value, expected) < 2**-7


@pytest.mark.parametrize("layer_type", ["sliding", "hca", "csa"])
def test_npu_layer_equals_transformers_forward_and_backward(stand_in, layer_type, monkeypatch):
    """The whole layer on the npu backend against transformers' DeepseekV4 attention (70
    tokens: past the window), its attention in the operator (CSA's picks as a mask: at this
    shape the rule would gather them)."""
    force_csa_form(monkeypatch, "mask")
    ours, theirs = pair(layer_type, seed=31, backend="npu")
    x = torch.randn(2, 70, HIDDEN, generator=torch.Generator().manual_seed(32))
    assert_equals_transformers(ours, theirs, x)
    assert "npu_fusion_attention_v2" in stand_in.calls


GATHERED = {  # CSA cases whose picks the reference gathers, at the operator's 512 channels
    "two documents": ("csa", 4, 512, 16, [30, 29]),
    "eight heads, short window": ("csa", 8, 512, 4, [13, 20]),
}


@pytest.mark.parametrize("name", GATHERED)
def test_gathered_picks_in_bf16_equal_a_per_query_loop(stand_in, monkeypatch, name):
    """CSA's gathered picks through npu_sparse_flash_attention and its backward operator
    (the stand-in's FlashAttention backward from the output and sums it is handed): output,
    normaliser and the gradients of queries, keys, sinks and entries against the per-query
    float64 loop, within twice the bf16 reference's own error or two units of bf16's
    rounding."""
    monkeypatch.setattr(reference, "picks_as_mask", lambda *_: False)
    rounding = torch.finfo(torch.bfloat16).eps  # two units of rounding (eps / 2 each)
    assert_equals_the_loop("npu", case(*GATHERED[name]), torch.bfloat16, rounding)
    # the reference's run, then the operator's forward and backward
    assert stand_in.calls == ["npu_sparse_flash_attention", "npu_sparse_flash_attention_grad"]


def test_a_sink_far_above_the_keys_does_not_overflow(stand_in, monkeypatch):
    """A sink 100 above every logit (e^100 overflows float32): the output ~0 and the
    normaliser the sink's, finite, as the float64 reference has them."""
    monkeypatch.setattr(reference, "picks_as_mask", lambda *_: False)
    q, kv, positions, sinks, window, entries = case("csa", 4, 512, 16, [30])
    sinks = sinks + 100.0
    args = [t.to(torch.bfloat16) for t in (q, kv)] + [positions, sinks, window]
    bf16 = reference.EntryKV(entries.values.bfloat16(), entries.layout, entries.picks,
                             entries.picked)  # fmt: skip
    out, lse = npu_v4_attention.v4_attention(*args, bf16)
    wide = reference.EntryKV(entries.values.double(), entries.layout, entries.picks,
                             entries.picked)  # fmt: skip
    exact_out, exact_lse = reference.v4_attention(q.double(), kv.double(), positions,
                                                  sinks.double(), window, wide)  # fmt: skip
    assert stand_in.calls == ["npu_sparse_flash_attention"]
    assert torch.isfinite(lse).all() and torch.isfinite(out).all()
    torch.testing.assert_close(lse.double(), exact_lse.double(), rtol=1e-6, atol=0)
    assert out.abs().max() < 1e-30 and exact_out.abs().max() < 1e-30


def test_the_sparse_lists_hold_the_window_then_the_picks(stand_in):
    """Each query's list: the tokens up to itself in its window and document (newest
    first), then its visible picks past the T token rows, then -1 (written out for one
    query of each kind)."""
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    picks = torch.tensor([[[1, 0]] * 7])
    picked = torch.tensor([[[False, False]] * 3 + [[True, False], [False, False], [True, True],
                                                   [False, True]]])  # fmt: skip
    listed = npu_v4_attention.sparse_key_indices(positions, 3, picks, picked)
    assert listed.dtype == torch.int32 and listed.shape == (1, 7, 1, 5)
    expected = {
        0: [0, -1, -1, -1, -1],  # a document's first token: itself
        3: [3, 2, 1, 8, -1],  # window of 3, then pick 1 (row 7 + 1)
        4: [4, -1, -1, -1, -1],  # a new document: nothing behind it
        5: [5, 4, 8, 7, -1],
        6: [6, 5, 4, 7, -1],  # its second pick only
    }
    for t, row in expected.items():
        assert listed[0, t, 0].tolist() == row, t


@pytest.mark.parametrize(
    "shape, dtype",
    [((8, 512), torch.float32), ((8, 512), torch.float16), ((6, 512), torch.bfloat16),
     ((8, 64), torch.bfloat16)],
)  # fmt: skip
def test_gathered_picks_the_operator_does_not_take_run_the_reference(stand_in, monkeypatch,
                                                                     shape, dtype):  # fmt: skip
    """Gathered picks in float32 or float16 (the operator's output is bf16), with 6 heads (a
    power of two to 128) or 64 channels (512): the reference runs, no operator call; the
    table's note says so."""
    monkeypatch.setattr(reference, "picks_as_mask", lambda *_: False)
    q, kv, positions, sinks, window, entries = case("csa", *shape, 16, [50])
    q, kv = q.to(dtype), kv.to(dtype)
    entries = reference.EntryKV(entries.values.to(dtype), entries.layout, entries.picks,
                                entries.picked)  # fmt: skip
    got = kernels.get("v4_attention", "npu")(q, kv, positions, sinks, window, entries)
    expected = reference.v4_attention(q, kv, positions, sinks, window, entries)
    assert stand_in.calls == []
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
    line = kernels.describe("npu", torch.bfloat16)
    assert "v4_attention (CSA's gathered picks in bfloat16, 1 to 128 heads" in line


def test_a_v4_model_on_the_npu_backend_trains_as_the_reference_one(stand_in):
    """A sliding, a CSA and an HCA layer (transformers' parity model's shape): loss and every
    parameter gradient as the reference backend's, V4 attention in the operator."""
    from test_hf_parity import v4_config

    assert_backend_trains_as_reference("npu", seed=4, cfg=v4_config())
    assert "npu_fusion_attention_v2" in stand_in.calls


class _SavingAttention(torch.autograd.Function):
    """npu_fusion_attention_v2 keeping for backward what torch_npu's autograd node keeps
    (op-plugin's generated node: query, key, value, atten_mask and the four results)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, sink, scale):
        with torch.no_grad():
            out, largest, sums, empty, *_ = StandIn().npu_fusion_attention_v2(
                query, key, value, query.shape[2], "BSND", atten_mask=mask, scale=scale,
                keep_prob=1.0, sparse_mode=0, sink=sink,
            )  # fmt: skip
        out = out.contiguous()  # the operator's BSND output
        ctx.save_for_backward(query, key, value, mask, out, largest, sums, empty)
        return out, largest, sums, empty


class _SavingStandIn(StandIn):
    def npu_fusion_attention_v2(self, query, key, value, head_num, input_layout, *,
                                atten_mask, scale, keep_prob, sparse_mode, sink):  # fmt: skip
        return *_SavingAttention.apply(query, key, value, atten_mask, sink, scale), 0, 0, 0


@pytest.mark.parametrize("kind", ["sliding", "hca", "csa"])
def test_what_the_operator_keeps_per_token(monkeypatch, kind):
    """Per token: 2 H D values (query blocks, output), the blocks' keys ((2W + E) D / W),
    their mask (2W + E bytes), 17 float32 per head (max and sum in 8 copies, the
    normaliser): written out, against the bytes autograd keeps."""
    from conftest import saved_bytes

    monkeypatch.setitem(sys.modules, "torch_npu", _SavingStandIn())
    heads, dim, window = 4, 32, 8
    q, kv, positions, sinks, window, entries = case(kind, heads, dim, window, [64])
    inputs = [t.requires_grad_() for t in (q, kv)]
    if entries is not None:
        entries.values.requires_grad_()
    attention = torch.nn.Module()
    attention.sinks = torch.nn.Parameter(sinks)  # a parameter, as the model's
    attention.forward = lambda q, kv: kernels.get("v4_attention", "npu")(
        q, kv, positions, attention.sinks, window, entries
    )[0]
    count = 0 if entries is None else entries.values.shape[1]
    keys = 2 * window + count
    per_token = 2 * heads * dim * 4 + keys * dim * 4 / window + keys + 17 * heads * 4
    tokens = q.shape[0] * q.shape[1]
    assert saved_bytes(attention, *inputs) == per_token * tokens


def test_what_the_sparse_operator_keeps_per_token(stand_in, monkeypatch):
    """CSA's gathered picks in bfloat16, per token: the query and the output (2 H D), the key
    rows (the token's and its share of the entries', (T + E) D / T), its list of W + k rows
    (int32) and 3 float32 per head (max, sum with the sink, normaliser): written out, against
    the bytes autograd keeps."""
    from conftest import saved_bytes

    monkeypatch.setattr(reference, "picks_as_mask", lambda *_: False)
    heads, dim, window = 4, 512, 8
    q, kv, positions, sinks, window, entries = case("csa", heads, dim, window, [64])
    q, kv = (t.to(torch.bfloat16).requires_grad_() for t in (q, kv))
    values = entries.values.to(torch.bfloat16).requires_grad_()
    entries = reference.EntryKV(values, entries.layout, entries.picks, entries.picked)
    attention = torch.nn.Module()
    attention.sinks = torch.nn.Parameter(sinks)
    attention.forward = lambda q, kv: kernels.get("v4_attention", "npu")(
        q, kv, positions, attention.sinks, window, entries
    )[0]
    seq, count, picks = q.shape[1], values.shape[1], entries.picks.shape[-1]
    per_token = 2 * heads * dim * 2 + (seq + count) * dim * 2 / seq + (window + picks) * 4
    per_token += 3 * heads * 4
    assert saved_bytes(attention, q, kv) == per_token * q.shape[0] * seq
    assert stand_in.calls == ["npu_sparse_flash_attention"]


def test_a_bf16_v4_model_takes_csa_picks_through_the_sparse_operator(stand_in, monkeypatch):
    """Under train.mixed_precision=bf16's autocast, CSA's picks gathered (forced: at this
    length the rule would mask), heads of 512 channels: the CSA layer's attention runs
    npu_sparse_flash_attention forward and backward, and loss and gradients are the
    reference backend's within bf16 rounding (cosine above 0.998: the operators hand back
    bf16 where the reference keeps float32; 0.9984 for the mask form's operator too)."""
    from test_hf_parity import v4_config

    force_csa_form(monkeypatch, "gather")
    cfg = v4_config()  # with the operator's heads of 512 channels
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, head_dim=512))
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(5))
    assert_bf16_trains_as_reference("npu", cfg, tokens, cosine=0.998)
    sparse = {"npu_sparse_flash_attention", "npu_sparse_flash_attention_grad"}
    assert sparse <= set(stand_in.calls)
