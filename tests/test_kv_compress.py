"""V4's compressed KV entries (op `kv_compress`): the reference, the cpu backend's C pass
(kernels/cpu_kv_compress.c) and the triton backend's kernels (kernels/triton_kv_compress.py,
interpreted here) against a loop over the entries written out in float64, forward and the
gradients of kv, gate and the position bias, on packed documents (positions restart, so some
blocks have no previous block and some rows fewer entries)."""

from __future__ import annotations

import pytest
import torch

from birkhoff import kernels
from birkhoff.kernels import cpu_kv_compress
from birkhoff.model.compression import block_entries

RATIO, DIM = 4, 70  # 70 channels: a chunk of 64 and a rest


def positions_of(lengths: list[list[int]]) -> torch.Tensor:
    """(B, T) positions of rows packed with documents of the given lengths."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])


def written_out(kv, gate, bias, positions, overlap):
    """Entry by entry in float64: the blocks of `ratio` tokens starting at a document position
    divisible by it, complete within the document; CSA's previous block where the entry's
    position is at least `ratio` (in the same document, by construction)."""
    batch, seq = positions.shape
    dim = kv.shape[-1] // 2 if overlap else kv.shape[-1]
    rows = []
    for b in range(batch):
        entries = []
        for t in range(seq):
            p = int(positions[b, t])
            end = t + RATIO - 1
            if p % RATIO or end >= seq or int(positions[b, end]) != p + RATIO - 1:
                continue
            slots_kv, slots_z = [], []
            if overlap and p >= RATIO:
                for i in range(RATIO):
                    slots_kv.append(kv[b, t - RATIO + i, :dim])
                    slots_z.append(gate[b, t - RATIO + i, :dim] + bias[i, :dim])
            for i in range(RATIO):
                lead = dim if overlap else 0
                slots_kv.append(kv[b, t + i, lead:])
                slots_z.append(gate[b, t + i, lead:] + bias[i, lead:])
            w = torch.softmax(torch.stack(slots_z), dim=0)
            entries.append((w * torch.stack(slots_kv)).sum(0))
        rows.append(entries)
    slots = seq // RATIO
    out = kv.new_zeros(batch, slots, dim)
    for b, entries in enumerate(rows):
        for e, value in enumerate(entries):
            out[b, e] = value
    return out


def entries_of(layout) -> tuple[torch.Tensor, ...]:
    return layout.start, layout.exists, layout.has_previous


def inputs(lengths, overlap, seed=0):
    g = torch.Generator().manual_seed(seed)
    positions = positions_of(lengths)
    width = 2 * DIM if overlap else DIM
    shape = (*positions.shape, width)
    kv, gate = torch.randn(shape, generator=g), 2 * torch.randn(shape, generator=g)
    bias = torch.randn(RATIO, width, generator=g)
    return kv, gate, bias, positions


LAYOUTS = [[[29]], [[9, 14, 6], [4, 3, 22]], [[3, 2, 1], [6]]]  # the last: a row with none


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("lengths", LAYOUTS)
def test_compressed_entries_equal_the_loop_over_entries(backend, overlap, lengths):
    kv, gate, bias, positions = inputs(lengths, overlap)
    layout = block_entries(positions, RATIO)
    leaves = [t.clone().requires_grad_() for t in (kv, gate, bias)]
    out = kernels.get("kv_compress", backend)(*leaves, *entries_of(layout), overlap)
    exact_leaves = [t.double().requires_grad_() for t in (kv, gate, bias)]
    exact = written_out(*exact_leaves, positions, overlap)
    assert out.shape == exact.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    exact.backward(grad.double())
    for got, expected in zip(leaves, exact_leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), expected.grad, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_fused_compression_in_bf16_rounds_once(backend):
    """Computed in float32 and rounded once (Triton's interpreter truncates: one bf16 step)."""
    kv, gate, bias, positions = inputs([[9, 14, 6]], True, seed=2)
    layout = block_entries(positions, RATIO)
    fn = kernels.get("kv_compress", backend)
    out = fn(kv.bfloat16(), gate.bfloat16(), bias, *entries_of(layout), True)
    exact = written_out(kv.bfloat16().double(), gate.bfloat16().double(), bias.double(),
                        positions, True)  # fmt: skip
    assert out.dtype == torch.bfloat16
    step = 2**-8 if backend == "cpu" else 2**-7
    assert ((out.double() - exact).abs() <= step * exact.abs() + 1e-6).all()


def test_the_cpu_compression_refuses_a_block_outside_its_row():
    kv, gate, bias, _ = inputs([[29]], True, seed=3)
    kind = torch.ones(1, 7, dtype=torch.uint8)
    start = torch.arange(0, 28, 4)[None].clone()
    start[0, 6] = 27  # its block would end past the row
    with pytest.raises(RuntimeError, match="outside its row"):
        cpu_kv_compress.kv_compress_op(kv, gate, bias, start, kind, DIM)
    start[0, 6], kind[0, 0] = 24, 2  # the first block has no previous one to read
    with pytest.raises(RuntimeError, match="outside its row"):
        cpu_kv_compress.kv_compress_op(kv, gate, bias, start, kind, DIM)


@pytest.mark.parametrize("overlap", [True, False])
def test_the_cpu_compression_op_is_a_well_formed_custom_op(overlap):
    kv, gate, bias, positions = inputs([[9, 14, 6]], overlap, seed=4)
    layout = block_entries(positions, RATIO)
    kind = layout.exists.to(torch.uint8) + (layout.has_previous & overlap).to(torch.uint8)
    args = (kv.requires_grad_(), gate.requires_grad_(), bias.requires_grad_(), layout.start,
            kind, DIM)  # fmt: skip
    torch.library.opcheck(cpu_kv_compress.kv_compress_op, args)
