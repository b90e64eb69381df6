"""V4 attention on the `npu` backend (kernels/npu_v4_attention.py) through a stand-in torch_npu
whose npu_fusion_attention_v2 computes its documented formula, sink included
(tests/npu_stand_in.py): output, normaliser and every input's gradient (queries, keys, entries,
sinks) against a per-query float64 loop written from the rules (tests/test_cpu_v4_attention.py),
for a sliding-window, an HCA and a CSA layer with documents packed, and each whole layer against
transformers' DeepseekV4 attention; the calls the operator does not take run the reference. The
call's signature is checked against the wheel's docs in test_npu_backend.py."""

from __future__ import annotations

import sys

import pytest
import torch
from npu_stand_in import StandIn
from test_cpu_v4_attention import CASES, assert_equals_the_loop, case, relative, run
from test_v4_attention import HIDDEN, assert_equals_transformers, force_csa_form, pair

from birkhoff import kernels
from birkhoff.kernels import npu_v4_attention
from birkhoff.kernels import v4_attention as reference
from conftest import assert_backend_trains_as_reference


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


def test_gathered_picks_run_the_reference(stand_in):
    """CSA picks the reference gathers (few picks, many entries, narrow heads): the
    reference runs, no operator call; the table's note says so."""
    q, kv, positions, sinks, window, entries = case("csa", 8, 4, 16, [50])
    assert not reference.picks_as_mask(8, entries.values.shape[1], 5, 4)
    got = kernels.get("v4_attention", "npu")(q, kv, positions, sinks, window, entries)
    expected = reference.v4_attention(q, kv, positions, sinks, window, entries)
    assert stand_in.calls == []
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
    line = kernels.describe("npu", torch.bfloat16)
    assert "v4_attention (CSA's picks as a mask only (picks_as_mask; the gathered" in line


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
