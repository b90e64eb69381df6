"""The fused `engram_merge` of the `cpu` backend (kernels/cpu_engram.c through cpu_engram.py)
and of the `triton` backend (kernels/triton_engram_merge.py, interpreted here) against the
reference composition (the gather-and-gate, RMSNorm, the causal convolution, SiLU and the sum,
kernels/reference.py) run in float64: the output and every input's gradient, with lags that
reach before a sequence's start, one stream (a plain residual), channels past one chunk of 64,
a large norm eps; in bf16 and under autocast; torch.library's checks and the refusals.

The gate's gradient runs through sqrt|s| (s the normalised similarity), which is steep where
s is near 0: float32 misses float64 there by far more than elsewhere, whoever computes it. So
the op is held to the reference's own float32 error (a small factor of it), not to a fixed
tolerance."""

from __future__ import annotations

import pytest
import torch

from birkhoff import kernels
from birkhoff.kernels import cpu_engram, reference

ERROR_FACTOR = 4  # how far past the float32 reference's own error the op may land
FLOOR = 1e-6  # relative to the largest value: below it an error is float32 rounding anyway


def merge_inputs(
    seqs: int, length: int, n: int, width: int, lags: int, heads: int = 4, dim: int = 8
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(indices, [table, key weight, value weight, streams, norm weight, conv weight])"""
    rows = 40
    indices = torch.randint(0, rows, (seqs, length, heads))
    tensors = [
        torch.randn(rows, dim),
        torch.randn(n * width, heads * dim) / 4,
        torch.randn(width, heads * dim) / 4,
        torch.randn(seqs, length, n, width),
        torch.rand(width) + 0.5,
        torch.randn(lags, width) / 2,  # trained: the model's starts at 0 (a no-op)
    ]
    return indices, tensors


FUSED = ["cpu", "triton"]


def run(op, indices, tensors, dtype, grad, dilation, eps, with_alpha=False):
    """op's output and the gradients of every tensor input, computed in `dtype` (and the
    gates, `with_alpha`)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    table, key, value, streams, norm, conv = leaves
    out, alpha = op(table, indices, key, value, streams, norm, conv, dilation, eps)
    assert not alpha.requires_grad and alpha.shape == streams.shape[:-1]
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return (out, *grads, alpha) if with_alpha else (out, *grads)


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    ("seqs", "length", "n", "width", "lags", "dilation", "eps"),
    [
        (2, 13, 4, 48, 4, 3, 1e-6),  # tiny's convolution; lags reach before the start
        (1, 7, 1, 80, 3, 2, 0.3),  # one stream; a second, partial chunk of channels
        (3, 40, 2, 64, 4, 3, 1e-6),
        (2, 1, 4, 16, 4, 3, 1e-6),  # one token: only lag 0
        (1, 9, 2, 200, 2, 1, 1e-6),  # dilation 1; four chunks of channels, the last of 8
    ],
)
@pytest.mark.parametrize("backend", FUSED)
def test_the_fused_engram_merge_matches_the_reference(
    backend, seqs, length, n, width, lags, dilation, eps
):
    """The output, every gradient and the gates (alpha, what the statistics read)."""
    torch.manual_seed(seqs * length + width)
    indices, tensors = merge_inputs(seqs, length, n, width, lags)
    tensors[3][0, 0, 0] = 0  # similarity 0: the sqrt's clamp (no gradient through it)
    grad = torch.randn(seqs, length, n, width, dtype=torch.float64)
    options = (grad, dilation, eps, True)
    exact = run(reference.engram_merge, indices, tensors, torch.float64, *options)
    own = run(reference.engram_merge, indices, tensors, torch.float32, *options)
    got = run(kernels.get("engram_merge", backend), indices, tensors, torch.float32, *options)
    names = ["output", "table", "key", "value", "streams", "norm weight", "conv weight"]
    names += ["gates"]
    for name, g, o, e in zip(names, got, own, exact, strict=True):
        assert g.dtype == torch.float32, name
        bound = ERROR_FACTOR * relative_error(o, e) + FLOOR
        assert relative_error(g, e) <= bound, (name, relative_error(g, e), relative_error(o, e))


@pytest.mark.parametrize("backend", FUSED)
def test_in_bf16_and_under_autocast_as_accurate_as_the_reference(backend):
    """Every tensor in bf16 (FSDP's param_dtype): computed in float32, returned rounded. Under
    bf16 autocast the projections come in bf16 and the residual stays float32; the op computes
    from them in float32 where the reference rounds the gated value to bf16 as well. Either
    way every output and gradient lands as near float64 as the reference's own (measured over
    four seeds: at most 1.7x its error)."""
    torch.manual_seed(3)
    indices, tensors = merge_inputs(2, 9, 4, 32, 4)
    grad = torch.randn(2, 9, 4, 32, dtype=torch.float64)
    options = (grad, 3, 1e-6)
    exact = run(reference.engram_merge, indices, tensors, torch.float64, *options)
    fused = kernels.get("engram_merge", backend)
    got = run(fused, indices, tensors, torch.bfloat16, *options)
    own = run(reference.engram_merge, indices, tensors, torch.bfloat16, *options)
    assert all(t.dtype == torch.bfloat16 for t in got)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_autocast = run(fused, indices, tensors, torch.float32, *options)
        own_autocast = run(reference.engram_merge, indices, tensors, torch.float32, *options)
    assert got_autocast[0].dtype == own_autocast[0].dtype == torch.float32
    pairs = [*zip(got, own, exact, strict=True)]
    pairs += zip(got_autocast, own_autocast, exact, strict=True)
    for g, o, e in pairs:
        assert g.dtype == o.dtype
        assert relative_error(g, e) <= 2 * relative_error(o, e) + 2e-3


@pytest.mark.parametrize("backend", FUSED)
def test_no_token_gives_no_token(backend):
    """An empty batch or sequence comes back empty (the kernel is not called), as the
    reference's does."""
    for seqs, length in ((2, 0), (0, 5)):
        indices, tensors = merge_inputs(seqs, length, 2, 16, 4)
        table, key, value, streams, norm, conv = tensors
        args = (table, indices, key, value, streams, norm, conv, 3, 1e-6)
        got, alpha = kernels.get("engram_merge", backend)(*args)
        assert got.shape == reference.engram_merge(*args)[0].shape == (seqs, length, 2, 16)
        assert alpha.shape == (seqs, length, 2)


def test_the_cpu_engram_merge_is_a_well_formed_custom_op():
    """torch.library's checks: schema, fake version, autograd registration, AOTAutograd."""
    torch.manual_seed(0)
    streams, keys = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 4, 8)
    args = (streams, keys, torch.randn(2, 7, 8), torch.rand(8) + 0.5, torch.randn(4, 8), 3, 1e-6)
    grads = [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
    torch.library.opcheck(cpu_engram.engram_merge_op, grads)


def test_the_cpu_engram_merge_refuses_what_its_kernel_cannot_index():
    streams, keys, value = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 4, 8), torch.randn(2, 7, 8)
    norm, conv = torch.rand(8), torch.randn(4, 8)
    bad = [
        (streams.flatten(0, 1), keys.flatten(0, 1), value, norm, conv, 3),  # 3-D streams
        (streams, keys[:, :6], value, norm, conv, 3),
        (streams, keys, value[..., :7], norm, conv, 3),
        (streams, keys, value, torch.rand(7), conv, 3),
        (streams, keys, value, norm, torch.randn(4, 7), 3),
        (streams, keys, value, norm, conv, 0),  # no dilation
        (streams, keys.transpose(1, 2), value, norm, conv, 3),
        (streams.bfloat16(), keys, value, norm, conv, 3),
    ]
    for args in bad:
        with pytest.raises(RuntimeError, match=r"merge takes|convolution takes|cpu kernel"):
            cpu_engram.engram_merge_op(*args, 1e-6)
