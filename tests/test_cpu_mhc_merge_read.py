"""The cpu backend's `mhc_merge_read` (one sublayer's merge and the next connection's read in one
C pass each way; kernels/cpu_mhc_merge_read.py) against the reference's merge then read in
float64, every gradient: alone, with the merged streams' gradient from elsewhere or none, and
inside a chain read -> sublayer -> merge and read -> sublayer -> merge as a block runs it."""

from __future__ import annotations

import pytest
import torch
from test_cpu_kernels import read_inputs

from birkhoff import kernels
from birkhoff.kernels import cpu_mhc, cpu_mhc_merge_read, cpu_mhc_read, reference
from conftest import assert_within_own_error

OPS = {  # backend: (read, merge and read, merge)
    "reference": (reference.mhc_read, reference.mhc_merge_read, reference.mhc_post),
    "cpu": (cpu_mhc_read.mhc_read, cpu_mhc_merge_read.mhc_merge_read, cpu_mhc.mhc_post),
}


def merge_inputs(n: int, c: int, tokens: int) -> list[torch.Tensor]:
    """Streams (2, tokens, n, c), a sublayer's output, H_res (rows near a distribution, as
    Sinkhorn's) and H_post."""
    h_res = torch.softmax(torch.randn(2, tokens, n, n), -1)
    return [
        torch.randn(2, tokens, n, c),
        torch.randn(2, tokens, c),
        h_res,
        torch.rand(2, tokens, n) * 2,
    ]


def weighted(t: torch.Tensor, seed: int) -> torch.Tensor:
    """sum(t * r) with r fixed by the seed, in t's dtype."""
    r = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (t * r.to(t.dtype)).sum()


def gradients(run, tensors, dtype) -> tuple[torch.Tensor, ...]:
    leaves = [t.to(dtype).requires_grad_() for t in tensors]
    return torch.autograd.grad(run(leaves), leaves, allow_unused=True)


def assert_matches_reference(run, tensors) -> None:
    """run(backend, leaves) -> loss on the cpu ops in float32 against the reference in float64,
    within twice the float32 reference's own error (at least 1e-5), element by element."""
    exact = gradients(lambda leaves: run("reference", leaves), tensors, torch.float64)
    own = gradients(lambda leaves: run("reference", leaves), tensors, torch.float32)
    got = gradients(lambda leaves: run("cpu", leaves), tensors, torch.float32)
    for i, (e, o, g) in enumerate(zip(exact, own, got, strict=True)):
        if e is None:
            assert g is None or not g.any(), i
            continue
        assert_within_own_error(g, o, e, f"input {i}")


def merge_read_loss(outputs: list[int]):
    """The op's outputs named by index (0 the next input, 1 H_post, 2 H_res, 3 the merged
    streams) weighted into a loss."""

    def run(backend: str, leaves: list[torch.Tensor]) -> torch.Tensor:
        form_eps = 1e-6 if leaves[0].shape[-2] != 3 else None  # both Sinkhorn forms
        out = OPS[backend][1](*leaves, 1e-6, 20, form_eps)
        return sum(weighted(out[i], i) for i in outputs)

    return run


# n = 4 (the merge's unrolled loops, tiles and a tail of columns), 3 (log-space Sinkhorn), 1,
# 2, 6 (the merge's loops for more than 4 streams)
SHAPES = [(4, 96, 37), (3, 40, 5), (1, 24, 16), (2, 80, 9), (6, 72, 7)]


@pytest.mark.parametrize(("n", "c", "tokens"), SHAPES)
def test_the_fused_merge_and_read_matches_the_reference(n, c, tokens):
    """Every output used, the merged streams too (their gradient from elsewhere joins the
    read's before the merge's backward takes it): every input's gradient is the reference's."""
    torch.manual_seed(n * c + tokens)
    tensors = merge_inputs(n, c, tokens) + read_inputs(n, c, tokens)[1:]
    assert_matches_reference(merge_read_loss([0, 1, 2, 3]), tensors)


@pytest.mark.parametrize("outputs", [[0], [3], [1, 2], [0, 2]])
def test_the_fused_merge_and_read_takes_outputs_with_no_gradient(outputs):
    """Outputs the loss does not use reach the backward as None (NULL in C): the merged
    streams with no gradient from elsewhere, or the sublayer's input unused."""
    torch.manual_seed(len(outputs))
    tensors = merge_inputs(4, 48, 21) + read_inputs(4, 48, 21)[1:]
    assert_matches_reference(merge_read_loss(outputs), tensors)


def chain(backend: str, leaves: list[torch.Tensor]) -> torch.Tensor:
    """Two connections as a block runs them: read, sublayer, then the merge taken with the
    next read, sublayer, merge; the loss also reads the merged streams between the two."""
    read, merge_read, merge = OPS[backend]
    streams, w_first, w_second, *mappings = leaves
    first, second = mappings[:5], mappings[5:]
    layer_in, h_post, h_res, passed = read(streams, *first, 1e-6, 20, 1e-6)
    out = torch.tanh(layer_in @ w_first)
    layer_in, h_post_2, h_res_2, merged = merge_read(
        passed, out, h_res, h_post, *second, 1e-6, 20, 1e-6
    )
    final = merge(merged, torch.tanh(layer_in @ w_second), h_res_2, h_post_2)
    return weighted(final, 0) + weighted(merged, 1)


@pytest.mark.parametrize(("n", "c", "tokens"), SHAPES[:3])
def test_a_block_of_two_connections_matches_the_reference(n, c, tokens):
    """The fused op between two connections: the first read's passed streams into it, its
    merged streams into the last merge; every gradient is the reference's."""
    torch.manual_seed(n + c + tokens)
    streams, *first = read_inputs(n, c, tokens)
    second = read_inputs(n, c, tokens)[1:]
    sublayers = [torch.randn(c, c) / c**0.5 for _ in range(2)]
    assert_matches_reference(chain, [streams, *sublayers, *first, *second])


def test_bf16_streams_take_the_merge_then_the_read():
    """Streams in bf16 take the cpu backend's merge and then its read (the fused op is float32
    only): the merged streams come back in bf16 within one bf16 rounding of the exact merge,
    and the read's outputs within one rounding of the exact read of those merged streams."""
    torch.manual_seed(0)
    tensors = merge_inputs(4, 32, 9) + read_inputs(4, 32, 9)[1:]
    tensors[0] = tensors[0].bfloat16()
    layer_in, h_post, h_res, merged = cpu_mhc_merge_read.mhc_merge_read(*tensors, 1e-6, 20, None)
    assert merged.dtype == torch.bfloat16
    exact = reference.mhc_post(*(t.double() for t in tensors[:4]))
    torch.testing.assert_close(merged.double(), exact, rtol=2**-7, atol=1e-6)
    read = reference.mhc_read(merged.double(), *(t.double() for t in tensors[4:]), 1e-6, 20)
    torch.testing.assert_close(layer_in.double(), read[0], rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(h_post.double(), read[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_res.double(), read[2], rtol=1e-5, atol=1e-5)


def test_the_backends_register_the_merge_and_read():
    """cpu runs its own, and triton composes its merge and its read (triton_mhc_mapping.py):
    neither runs the reference's composition, which would be a fallback."""
    assert kernels.implementations("cpu")["mhc_merge_read"] == "cpu"
    assert kernels.implementations("triton")["mhc_merge_read"] == "triton"


def test_each_block_takes_its_attention_merge_with_its_ffn_read():
    """A block reads once, merges and reads once (the fused op), and merges once at its end,
    where its output leaves for Engram, the next block, a checkpoint or a pipeline stage."""
    from birkhoff.model import build_model
    from birkhoff.model.mhc import HyperConnection
    from conftest import small_model

    cfg = small_model(num_layers=3, max_seq_len=16)
    model = build_model(cfg, "cpu", seed=0)
    calls = {"read": 0, "merge_read": 0, "post": 0}
    for module in model.modules():
        if isinstance(module, HyperConnection):
            for name in calls:
                op = getattr(module, f"_{name}")

                def counted(*args, op=op, name=name):
                    calls[name] += 1
                    return op(*args)

                setattr(module, f"_{name}", counted)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert calls == {"read": 3, "merge_read": 3, "post": 3}
