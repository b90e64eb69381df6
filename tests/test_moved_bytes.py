"""The device-memory bytes counter (kernels/moved_bytes.py) against byte counts written out
by hand: aten ops (views, allocations and matmuls move nothing; an in-place op reads and
writes its target), Triton kernels under the interpreter (masked lanes, addresses read by
every program, atomics) and a fused op's traffic as its docstring states it."""

from __future__ import annotations

import pytest
import torch

from birkhoff import kernels
from birkhoff.kernels.moved_bytes import MovedBytes

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _scale_rows(x_ptr, w_ptr, y_ptr, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < cols
    x = tl.load(x_ptr + row * cols + offsets, mask=inside, other=0.0)
    w = tl.load(w_ptr + offsets, mask=inside, other=0.0)  # every program reads all of w
    tl.store(y_ptr + row * cols + offsets, x * w, mask=inside)


@triton.jit
def _column_sums(x_ptr, out_ptr, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < cols
    tl.atomic_add(out_ptr + offsets, tl.load(x_ptr + row * cols + offsets, mask=inside), inside)


@triton.jit
def _copy_tiles(x_ptr, y_ptr, rows, cols, TILE: tl.constexpr):
    tile = tl.program_id(0)
    source = tl.make_tensor_descriptor(x_ptr, [rows, cols], [cols, 1], [TILE, TILE])
    target = tl.make_tensor_descriptor(y_ptr, [rows, cols], [cols, 1], [TILE, TILE])
    target.store([tile * TILE, 0], source.load([tile * TILE, 0]))


def test_aten_ops_move_their_inputs_outputs_and_targets():
    x, y, w = torch.randn(6, 5), torch.randn(6, 5), torch.randn(5, 3)
    mix, streams = torch.randn(6, 4, 4), torch.randn(6, 4, 5)  # mHC's n x n by n x C
    wide, g, acc = torch.randn(2, 16, 16), torch.randn(6, 3), torch.zeros(5, 3)
    with MovedBytes() as moved:
        z = x * y  # reads 2, writes 1: 3 x 30 floats
        x.add_(y)  # reads x and y, writes x: 3 x 30
        x.view(30)  # a view: nothing
        torch.empty(1000)  # an allocation: nothing
        z @ w  # a matmul: timed at the peak, not counted
        acc.addmm_(z.t(), g)  # in place too
        wide @ wide  # batched, every side above 8
        mix @ streams  # batched with a side of 4: memory-bound, counted (96 + 2 x 120)
        torch.zeros_like(z)  # writes 30: z only gives the shape
        acc.copy_(z.t()[:, :3])  # reads 15, writes 15
        torch.mul(x, y, out=z)  # reads 60, writes 30
    assert dict(moved.by_name) == {
        "aten.mul": 4 * (90 + 90), "aten.add_": 360, "aten.bmm": 4 * 336,
        "aten.zeros_like": 4 * 30, "aten.copy_": 4 * 30,
    }  # fmt: skip


def test_a_triton_kernel_moves_each_address_once_and_no_masked_lane():
    rows, cols = 7, 20  # a block of 32: 12 lanes masked off in every program
    x, w, y = torch.randn(rows, cols), torch.randn(cols), torch.empty(rows, cols)
    moved = MovedBytes()
    with moved, moved.triton():
        _scale_rows[(rows,)](x, w, y, cols, BLOCK=32)
    assert moved.total == 4 * (rows * cols + cols + rows * cols)
    assert dict(moved.by_name) == {"triton._scale_rows": moved.total}
    torch.testing.assert_close(y, x * w)  # it ran


def test_tensor_descriptors_are_counted_as_their_tiles():
    """Descriptor loads and stores go through the interpreter's masked calls with keywords;
    a tile past the tensor's last row reads and writes only the rows inside."""
    rows, cols, tile = 20, 16, 16  # the second tile has 4 rows inside
    x, y = torch.randn(rows, cols), torch.zeros(rows, cols)
    moved = MovedBytes()
    with moved, moved.triton():
        _copy_tiles[(2,)](x, y, rows, cols, TILE=tile)
    assert moved.total == 4 * 2 * rows * cols
    torch.testing.assert_close(y, x)


def test_an_atomic_reads_and_writes_its_target():
    rows, cols = 5, 12
    x, out = torch.randn(rows, cols), torch.zeros(cols)
    moved = MovedBytes()
    with moved, moved.triton():
        _column_sums[(rows,)](x, out, cols, BLOCK=16)
    assert moved.total == 4 * (rows * cols + 2 * cols)
    torch.testing.assert_close(out, x.sum(0))


@pytest.mark.parametrize("streams", [2, 4])
def test_the_fused_mhc_post_reads_n_plus_one_widths_and_writes_n(streams):
    """The issue's rule for the fused merge: per token it reads the n streams and the layer's
    output ((n + 1) C) and H_res, h_post (n^2 + n), and writes the n next streams (n C); the
    reference moves more (its product and sum are separate kernels)."""
    batch, tokens, width = 2, 16, 24
    x = torch.randn(batch, tokens, streams, width)
    out = torch.randn(batch, tokens, width)
    h_res = torch.softmax(torch.randn(batch, tokens, streams, streams), -1)
    h_post = torch.rand(batch, tokens, streams)
    per_token = {}
    for backend in ("triton", "reference"):
        moved = MovedBytes()
        with moved, moved.triton():
            kernels.get("mhc_post", backend)(x, out, h_res, h_post)
        per_token[backend] = moved.total / (batch * tokens * 4)
    n, c = streams, width
    assert per_token["triton"] == (n + 1) * c + n * c + n * n + n
    assert per_token["reference"] > per_token["triton"]
