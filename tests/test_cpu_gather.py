"""The cpu backend's row gather (kernels/cpu_gather.c; Engram's table rows in `engram_merge`):
rows by index and the table's gradient, each row's gradients added in the order of the
indices, against a loop over the indices written out, and torch's index_select/index_add."""

from __future__ import annotations

import pytest
import torch

from birkhoff.kernels.cpu_gather import gather_op, gather_rows


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_and_the_tables_gradient_equal_a_loop_over_the_indices(threads):
    """Repeated indices (a row's gradients summed), rows no index reads (zero), 5 rows a
    thread or fewer: the same values whatever the thread count."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(7, 13, generator=g)
    index = torch.tensor([3, 0, 3, 6, 3, 1, 0])
    grad = torch.randn(7, 13, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        leaf = table.clone().requires_grad_()
        out = gather_rows(leaf, index)
        out.backward(grad)
    finally:
        torch.set_num_threads(previous)
    expected_grad = torch.zeros(7, 13)
    for i, row in enumerate(index.tolist()):  # in the order of the indices
        assert torch.equal(out[i], table[row])
        expected_grad[row] += grad[i]
    assert torch.equal(leaf.grad, expected_grad)
    torch_leaf = table.clone().requires_grad_()
    torch_leaf.index_select(0, index).backward(grad)
    assert torch.equal(leaf.grad, torch_leaf.grad)


def test_an_empty_index_gives_no_rows_and_a_zero_gradient():
    leaf = torch.randn(4, 3, requires_grad=True)
    out = gather_rows(leaf, torch.empty(0, dtype=torch.int64))
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(leaf.grad, torch.zeros(4, 3))


def test_indices_outside_the_table_are_refused_and_the_op_is_well_formed():
    table = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="outside the table's 4 rows"):
        gather_op(table, torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match="outside the table's 4 rows"):
        gather_op(table, torch.tensor([-1, 2]))
    with pytest.raises(RuntimeError, match="1-d int64 index"):
        gather_op(table, torch.tensor([0, 1], dtype=torch.int32))
    torch.library.opcheck(gather_op, (table.requires_grad_(), torch.tensor([2, 0, 2])))
