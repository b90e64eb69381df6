"""Kernel backends: every non-reference op against the reference forward and backward (a
float64 reference run of the same inputs), which implementation runs for each backend (the
fallbacks listed, never silent), how `backend.kernels` resolves per device, and a model built
with the Triton kernels against the same model with the reference ones. Triton runs under its
interpreter here (TRITON_INTERPRET=1, set in conftest.py where no GPU is visible)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from birkhoff import kernels
from birkhoff.errors import RecipeError
from birkhoff.kernels import (
    cpu_moe,
    reference,
    triton_engram,
    triton_mhc,  # triton is a dev dependency: no skip
    triton_mhc_mapping,
    triton_moe,
    triton_sinkhorn,
)
from conftest import (
    assert_backend_trains_as_reference,
    compare,
    concatenated,
    moe_engram_model,
)

SHAPES = [(4, 64), (3, 200), (1, 17)]  # (streams, channels): n not a power of 2, C > block


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


@pytest.mark.parametrize(("n", "c", "form_eps"), [(4, 64, None), (3, 40, 1e-3), (4, 200, 1e-6)])
def test_triton_mhc_mapping_matches_the_reference(n, c, form_eps):
    """RMS, projection, scales, biases, sigmoids and Sinkhorn (both forms) in one op: all
    three mappings and the gradients of the streams, the projection, the scales and the
    biases. 10 tokens: a block of 16 partly filled; n = 3 pads 15 values to 16; n C = 800
    spans 13 steps of 64; V4's form with eps 1e-3, large enough to see if it were dropped."""
    torch.manual_seed(n * c)
    values = 2 * n + n * n
    streams, weight = torch.randn(2, 5, n, c), torch.randn(values, n * c) / (n * c) ** 0.5
    alpha, biases = torch.rand(3) + 0.5, [torch.randn(n), torch.randn(n), torch.randn(n, n)]

    ops = (reference.mhc_mapping, triton_mhc_mapping.mhc_mapping)
    compare(
        *(concatenated(op, 1e-6, 20, form_eps) for op in ops), [streams, weight, alpha, *biases]
    )


def test_triton_mhc_read_is_its_mapping_then_its_read():
    """triton's mhc_read (its mapping kernels, then its stream read) against the reference's
    in float64: the sublayer's input, H_post, H_res and every input's gradient."""
    torch.manual_seed(11)
    n, c = 4, 32
    streams, weight = torch.randn(1, 5, n, c), torch.randn(24, n * c) / (n * c) ** 0.5
    inputs = [streams, weight, torch.rand(3) + 0.5, torch.randn(n), torch.randn(n), torch.eye(n)]

    ops = (reference.mhc_read, kernels.get("mhc_read", "triton"))
    compare(*(concatenated(op, 1e-6, 20, 1e-6) for op in ops), inputs)


@pytest.mark.parametrize("backend", [triton_moe, cpu_moe], ids=["triton", "cpu"])
@pytest.mark.parametrize(("tokens", "top_k", "c"), [(13, 3, 200), (6, 2, 16), (4, 1, 5)])
def test_moe_permutation_matches_the_reference(backend, tokens, top_k, c):
    """Permute and unpermute (with the gate weights), forward and backward, on the triton
    backend (k = 3 pads to 4, C = 200 spans two blocks) and the cpu one. The expert order and
    counts are the reference's exactly."""
    torch.manual_seed(tokens * top_k)
    experts = 5
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    x, rows = torch.randn(tokens, c), torch.randn(tokens * top_k, c)
    weights = torch.rand(tokens, top_k)

    def permuted(op):
        return lambda t: op(t, ids, experts)[0]

    compare(permuted(reference.moe_permute), permuted(backend.moe_permute), [x])
    _, order, counts = reference.moe_permute(x, ids, experts)
    _, got_order, got_counts = backend.moe_permute(x, ids, experts)
    assert torch.equal(got_order, order) and torch.equal(got_counts, counts)

    def merged(op):
        return lambda out, w: op(out, order, w, tokens)

    compare(merged(reference.moe_unpermute), merged(backend.moe_unpermute), [rows, weights])


@pytest.mark.parametrize(("n", "c"), SHAPES)
def test_triton_engram_gate_matches_the_reference(n, c):
    """The gather, projections and the fused gate against the reference, every input's
    gradient (table, both projections, streams); n = 3 pads to 4, C = 200 spans two blocks."""
    torch.manual_seed(n * c + 2)
    heads, dim, rows = 4, 8, 50
    indices = torch.randint(0, rows, (2, 5, heads))
    table, streams = torch.randn(rows, dim), torch.randn(2, 5, n, c)
    key_weight = torch.randn(n * c, heads * dim) / (heads * dim) ** 0.5
    value_weight = torch.randn(c, heads * dim) / (heads * dim) ** 0.5

    def gated(op):
        return lambda tab, wk, wv, h: op(tab, indices, wk, wv, h, 1e-6)

    inputs = [table, key_weight, value_weight, streams]
    compare(gated(reference.engram_gather_gate), gated(triton_engram.engram_gather_gate), inputs)


def test_triton_moe_and_engram_keep_the_dtypes_under_autocast():
    """bf16 expert outputs merge with float32 gate weights into bf16 tokens (triton and cpu),
    and the Engram gate of float32 streams with bf16 keys and value gives bf16, as the
    reference does."""
    torch.manual_seed(3)
    ids, rows, weights = torch.tensor([[0, 2], [1, 2], [2, 0]]), torch.randn(6, 8), torch.rand(3, 2)
    _, order, _ = reference.moe_permute(torch.randn(3, 8), ids, 3)
    rows = rows.bfloat16()
    expected = reference.moe_unpermute(rows, order, weights, 3)
    for backend in (triton_moe, cpu_moe):
        got = backend.moe_unpermute(rows, order, weights, 3)
        assert got.dtype == expected.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)  # float32 sums, rounded
    table, indices = torch.randn(20, 4), torch.randint(0, 20, (1, 3, 2))
    wk, wv, streams = torch.randn(64, 8) / 3, torch.randn(16, 8) / 3, torch.randn(1, 3, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference.engram_gather_gate(table, indices, wk, wv, streams, 1e-6)
        got = triton_engram.engram_gather_gate(table, indices, wk, wv, streams, 1e-6)
    assert got.dtype == expected.dtype == torch.bfloat16
    # alpha and the product each rounded to bf16 (the reference) or once (the kernel)
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=1e-3)


@triton.jit
def _stored_as_bf16(x_ptr, out_ptr, cast_ptr, n, BLOCK: tl.constexpr):
    at = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + at, mask=at < n)
    tl.store(out_ptr + at, x, mask=at < n)  # converted by the store
    tl.store(cast_ptr + at, x.to(tl.bfloat16), mask=at < n)


def test_the_interpreter_rounds_float32_to_bf16_to_the_nearest_even():
    """As the compiler's conversion (and torch's) does, where Triton's interpreter drops the
    low 16 bits (kernels/triton_interpreter.py): halfway values, values just above and below
    them, negatives, subnormals, infinities and NaN."""
    halfway = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF80C000, 0x7F7FFFFF]
    bits = torch.tensor([*halfway, 0x00008000, 0x7F800000, 0xFF800000, 0x7FC00000])
    x = torch.cat([bits.to(torch.int32).view(torch.float32), 3 * torch.randn(100)])
    out, cast = (torch.empty(len(x), dtype=torch.bfloat16) for _ in range(2))
    _stored_as_bf16[(1,)](x, out, cast, len(x), BLOCK=128)
    expected = x.bfloat16()
    for got in (out, cast):
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


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
    own = {"engram_gather_gate", "entry_mass", "mhc_mapping", "mhc_pre", "mhc_post", "mhc_read"}
    own |= {"engram_merge", "moe_permute", "mhc_merge_read"}
    own |= {"moe_unpermute", "sinkhorn_knopp", "sinkhorn_knopp_eps", "v4_attention"}
    own |= {"rope_trailing", "kv_compress", "moe_route", "indexer_loss"}  # its target's kernel
    own |= {"linear_cross_entropy", "rms_norm", "rope", "swiglu"}  # from liger-kernel
    assert {op for op, impl in table.items() if impl == "triton"} == own
    assert kernels.fallbacks("triton") == sorted(set(table) - own)
    assert kernels.fallbacks("reference") == []
    with pytest.raises(ValueError, match="'auto': not one of reference, cpu, triton, npu"):
        kernels.get("rms_norm", "auto")  # resolved per device before any model is built
    line = kernels.describe("triton")
    own_ops = "(engram_gather_gate, engram_merge, entry_mass, indexer_loss,"
    assert f"triton for 21 of {len(table)} ops {own_ops}" in line
    assert f"{len(table) - 21} fall back to reference: attention" in line


def test_kernel_backend_resolves_per_device(monkeypatch):
    assert kernels.backend_for("auto", "cpu") == "cpu"  # its C kernels build here
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


def test_a_model_with_moe_and_engram_trains_on_triton_as_on_the_reference():
    assert_backend_trains_as_reference("triton", cfg=moe_engram_model())
