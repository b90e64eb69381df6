"""The CSA indexer's target `entry_mass` (the attention's probability at each query's picks,
summed over heads): the reference against the formula written out per query in float64, in
one block and in many; the triton backend's kernel (run by Triton's interpreter here) against
the reference."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from birkhoff.kernels import triton_entry_mass, v4_attention
from birkhoff.kernels.v4_attention import entry_mass


def _inputs(batch, seq, heads, dim, entries, k, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, dim, generator=generator).to(dtype)
    values = torch.randn(batch, entries, dim, generator=generator).to(dtype)
    picks = torch.rand(batch, seq, entries, generator=generator).topk(k, dim=-1).indices
    picked = torch.rand(batch, seq, k, generator=generator) > 0.25
    lse = torch.randn(batch, seq, heads, generator=generator) + 2.0
    return q, values, picks, picked, lse


def _per_query(q, values, picks, picked, lse) -> torch.Tensor:
    """sum_h exp(<q_h, v_e> / sqrt(D) - lse_h) for each pick e, 0 where not picked: float64,
    one query and one pick at a time."""
    batch, seq, heads, dim = q.shape
    out = torch.zeros(picks.shape, dtype=torch.float64)
    for b in range(batch):
        for t in range(seq):
            for j in range(picks.shape[-1]):
                if not picked[b, t, j]:
                    continue
                entry = values[b, picks[b, t, j]].double()
                for h in range(heads):
                    logit = float(q[b, t, h].double() @ entry) / math.sqrt(dim)
                    out[b, t, j] += math.exp(logit - float(lse[b, t, h]))
    return out


class LargestTemporary(TorchDispatchMode):
    """The most floats any op's output holds."""

    def __init__(self) -> None:
        super().__init__()
        self.floats = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.floats = max(self.floats, t.numel())
        return out


@pytest.mark.parametrize("form", ["gathered", "mask"])
@pytest.mark.parametrize("budget", [None, 300])
def test_the_reference_is_the_formula_in_one_block_and_in_many(budget, form):
    """With its memory budget cut to 300 floats the reference takes 2 queries at a time
    (gathered: 2 x 5 picks x (2 x 3 heads + 8 channels) = 140 floats a query; as a mask: 2
    x 9 entries x 2 x 3 heads = 108; 4 blocks), and no temporary it makes but the result
    (2 x 7 x 5 = 70) holds more than the budget. Both of CSA's forms (picks_as_mask)."""
    inputs = _inputs(batch=2, seq=7, heads=3, dim=8, entries=9, k=5)
    patch = mock.patch.object(v4_attention, "MASS_QUERIES", budget or v4_attention.MASS_QUERIES)
    form_patch = mock.patch.object(v4_attention, "picks_as_mask", lambda *_: form == "mask")
    width = 9 if form == "mask" else 5
    with patch, form_patch, LargestTemporary() as largest:
        per_block = v4_attention.mass_queries_per_block(2, 3, width, 8, form == "gathered")
        got = entry_mass(*inputs)
    assert math.ceil(7 / per_block) == (4 if budget else 1)
    one_block = 2 * 7 * (9 * 3 if form == "mask" else 5 * 8)  # every query's logits or entries
    assert largest.floats <= (budget or one_block)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _per_query(*inputs), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("batch", "seq", "heads", "dim", "entries", "k"),
    [(2, 5, 3, 8, 9, 5), (1, 3, 20, 70, 40, 17), (1, 2, 16, 64, 16, 16)],
)
def test_the_triton_kernel_matches_the_reference(batch, seq, heads, dim, entries, k):
    """Heads, channels and picks that fill the kernel's blocks, spill into a second one, and
    fall short of one; unpicked slots 0."""
    inputs = _inputs(batch, seq, heads, dim, entries, k, seed=seq)
    expected = entry_mass(*inputs)
    got = triton_entry_mass.entry_mass(*inputs)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got[~inputs[3]] == 0).all() and (got[inputs[3]] > 0).all()


def test_the_triton_kernel_reads_bf16_as_the_reference_does():
    """bf16 queries and entries: both read them into float32 before the product."""
    inputs = _inputs(2, 4, 5, 24, 12, 6, dtype=torch.bfloat16, seed=3)
    torch.testing.assert_close(
        triton_entry_mass.entry_mass(*inputs), entry_mass(*inputs), rtol=1e-5, atol=1e-6
    )


def test_the_triton_indexer_loss_takes_its_target_from_the_kernel(monkeypatch):
    """The triton backend's `indexer_loss` launches this kernel once for its target, and its
    loss and gradients are the reference op's."""
    from birkhoff import kernels
    from birkhoff.kernels.indexer_loss import indexer_loss

    launches = []
    kernel = triton_entry_mass._entry_mass_kernel

    class Recorded:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_entry_mass, "_entry_mass_kernel", Recorded())
    q, values, picks, picked, lse = _inputs(1, 6, 3, 8, 9, 4, seed=4)
    generator = torch.Generator().manual_seed(5)
    index_q = torch.randn(1, 6, 2, 5, generator=generator)
    index_keys = torch.randn(1, 9, 5, generator=generator)
    weights = torch.randn(1, 6, 2, generator=generator)
    results = []
    for op in (kernels.get("indexer_loss", "triton"), indexer_loss):
        leaves = [t.clone().requires_grad_() for t in (index_q, index_keys, weights)]
        loss = op(q, values, lse, *leaves, picks, picked)
        results.append((loss, *torch.autograd.grad(loss, leaves)))
    assert len(launches) == 1
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
