"""The triton backend's V4 attention (FlexAttention, kernels/flex_v4_attention.py) against
independent implementations: transformers' DeepseekV4 attention layer and birkhoff's
reference op (itself checked against transformers in test_v4_attention.py).

torch refuses FlexAttention's backward on a CPU (its inductor template is forward-only) but
its unfused implementation of the same operator, mask function and block mask runs here; the
tests lift that guard to compare gradients. The block lists, which the unfused path does not
read, are checked pair by pair against the masking rules, and once through inductor's compiled
CPU kernel (forward; it has no log-sum-exp output on a CPU, so without sinks there).
"""

from __future__ import annotations

import pytest
import torch
from test_v4_attention import HIDDEN, assert_equals_transformers, assert_gradient_close, pair
from torch.nn.attention import flex_attention as flex_module

from birkhoff.kernels import flex_v4_attention as flex
from birkhoff.kernels import v4_attention as reference
from birkhoff.model.compression import block_entries
from birkhoff.model.context import SequenceContext

KINDS = ["sliding", "hca", "csa"]


pytestmark = pytest.mark.usefixtures("unfused_flex_with_gradients")


def backward_grads(layer, x, grad, aux):
    x = x.clone().requires_grad_()
    out = layer(x, SequenceContext(positions=aux.get("positions")), aux.setdefault("losses", []))
    total = (out * grad).sum() + sum(aux["losses"], torch.zeros(()))
    total.backward()
    grads = {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def assert_trains_as_the_reference(layers, layer_type: str, x, grad, aux: dict) -> dict:
    """The reference layer and the triton one (`layers`), in training mode (a "warm-up"
    layer type: the indexer's dense warm-up): output, input gradient and every parameter
    gradient alike. Returns the triton layer's parameter gradients."""
    results = []
    for layer in layers:
        layer.dense_indexing = layer_type.endswith("warm-up")
        results.append(backward_grads(layer.train(), x, grad, dict(aux)))
    (out_ref, dx_ref, grads_ref), (out, dx, grads) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name, expected in grads_ref.items():
        assert_gradient_close(grads[name], expected, name)
    return grads


@pytest.mark.parametrize("layer_type", KINDS)
def test_flex_layer_equals_transformers_forward_and_backward(layer_type):
    """150 tokens: two blocks of queries, so the block lists matter."""
    ours, theirs = pair(layer_type, seed=21, backend="triton")
    x = torch.randn(2, 150, HIDDEN, generator=torch.Generator().manual_seed(22))
    assert_equals_transformers(ours, theirs, x)


@pytest.mark.parametrize("layer_type", [*KINDS, "csa warm-up"])
def test_flex_layer_equals_the_reference_on_packed_documents(layer_type):
    """Documents of 130, 150 and 20 tokens packed in 300 (boundaries inside query blocks),
    in training mode: output, input and every parameter gradient, indexer loss included."""
    kind = layer_type.split()[0]
    layers = [pair(kind, seed=24, backend=backend)[0] for backend in ("reference", "triton")]
    lengths = [130, 150, 20]
    x = torch.randn(1, sum(lengths), HIDDEN, generator=torch.Generator().manual_seed(25))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(26))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    grads = assert_trains_as_the_reference(layers, layer_type, x, grad, {"positions": positions})
    if kind == "csa":  # the indexer learned from the loss on this backend's normaliser
        assert any(name.startswith("indexer.") for name in grads)


@pytest.mark.parametrize("layer_type", ["hca", "csa", "csa warm-up"])
def test_flex_layer_equals_the_reference_without_a_complete_block(layer_type):
    """3 tokens, fewer than a block of either ratio (4 and 8): no compressed entry exists,
    and the layer attends to its window alone, as the reference's does."""
    kind = layer_type.split()[0]
    layers = [pair(kind, seed=28, backend=backend)[0] for backend in ("reference", "triton")]
    x = torch.randn(2, 3, HIDDEN, generator=torch.Generator().manual_seed(29))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(30))
    assert_trains_as_the_reference(layers, layer_type, x, grad, {})


def entries_for(kind: str, positions: torch.Tensor, dim: int, k: int = 5):
    if kind == "sliding":
        return None
    layout = block_entries(positions, 4)
    batch, count = layout.start.shape
    values = torch.randn(batch, count, dim, generator=torch.Generator().manual_seed(27))
    if kind == "hca":
        return reference.EntryKV(values, layout)
    score = torch.randn(batch, positions.shape[1], count, generator=torch.Generator())
    top = score.masked_fill(~layout.visible(positions), -torch.inf).topk(k, dim=-1)
    return reference.EntryKV(values, layout, top.indices, torch.isfinite(top.values))


def allowed_pairs(positions, window, entries):
    """(B, T, T) and (B, T, E) bool (None without entries): the window's and the entries'
    masking rules, written out with dense tensors."""
    batch, seq = positions.shape
    behind = (torch.arange(seq)[:, None] - torch.arange(seq)[None, :])[None]
    in_window = (behind >= 0) & (behind < window) & (behind <= positions[:, :, None])
    if entries is None:
        return in_window, None
    if entries.picks is None:
        return in_window, entries.layout.visible(positions)
    seen = torch.zeros(batch, seq, entries.values.shape[1], dtype=torch.bool)
    for b, t, i in torch.nonzero(entries.picked).tolist():
        seen[b, t, entries.picks[b, t, i]] = True
    return in_window, seen


def assert_lists_and_mask(block_mask, allowed: torch.Tensor) -> torch.Tensor:
    """Every allowed pair's blocks listed, the mask function equal to `allowed` pair by pair
    (CSA: its picks read from one bit per entry). Returns the listed (B, query blocks, key
    blocks)."""
    listed = block_mask.to_dense()[:, 0].bool()
    b, q, k = torch.nonzero(allowed, as_tuple=True)
    assert listed[b, q // flex.BLOCK, k // flex.BLOCK].all()
    batch = torch.arange(allowed.shape[0])[:, None, None]
    query = torch.arange(allowed.shape[1])[None, :, None]
    key = torch.arange(allowed.shape[2])[None, None, :]
    pairs = block_mask.mask_mod(batch, torch.zeros((), dtype=torch.long), query, key)
    assert torch.equal(pairs.expand_as(allowed), allowed)
    return listed


@pytest.mark.parametrize("kind", KINDS)
def test_block_lists_cover_every_pair_the_mask_allows_and_skip_the_rest(kind):
    """700 tokens (6 query blocks), window 128, documents of 300, 290 and 110 tokens."""
    positions = torch.cat([torch.arange(n) for n in (300, 290, 110)])[None].expand(2, -1)
    window = 128
    entries = entries_for(kind, positions, 8)
    in_window, seen = allowed_pairs(positions, window, entries)
    listed = assert_lists_and_mask(flex._window_block_mask(positions, window), in_window)
    assert listed.sum(-1).max() == 2  # a window of 128 spans at most two key blocks
    if entries is None:
        return
    listed = assert_lists_and_mask(flex._entry_block_mask(positions, entries), seen)
    if kind == "csa":  # picks: exactly the entry blocks some query of the block picked from
        b, q, k = torch.nonzero(seen, as_tuple=True)
        needed = torch.zeros_like(listed)
        needed[b, q // flex.BLOCK, k // flex.BLOCK] = True
        assert torch.equal(listed, needed)
    if kind == "hca":  # the entries complete before a block's last query, in whole blocks
        assert (listed[:, 0].sum(-1) == 1).all()  # of 2 blocks


def dense_attention(q, keys, allowed):
    """q (B, T, H, D), keys = values (B, K, D), allowed (B, T, K): softmax over the allowed
    keys, zeros where none is."""
    scores = torch.einsum("bthd,bkd->bthk", q, keys) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~allowed[:, :, None], -torch.inf).softmax(-1).nan_to_num()
    return torch.einsum("bthk,bkd->bthd", probs, keys)


def test_compiled_flex_kernel_reads_the_block_lists_as_the_masks():
    """Inductor's CPU FlexAttention kernel (compiled, forward) with the window's and the CSA
    entries' block masks and mask functions (300 tokens in 3 documents; the entries a
    broadcast view of a head per query head), each call against a dense softmax over the
    allowed pairs (the CPU kernel has no log-sum-exp output, which the merge needs)."""
    positions = torch.cat([torch.arange(n) for n in (130, 150, 20)])[None].expand(2, -1)
    seq, heads, dim, window = positions.shape[1], 4, 16, 40
    generator = torch.Generator().manual_seed(28)
    q = torch.randn(2, seq, heads, dim, generator=generator)
    kv = torch.randn(2, seq, dim, generator=generator)
    entries = entries_for("csa", positions, dim)
    in_window, seen = allowed_pairs(positions, window, entries)
    compiled = torch.compile(flex_module.flex_attention, dynamic=False)
    values = entries.values[:, None].expand(-1, heads, -1, -1)
    calls = [
        (kv[:, None], flex._window_block_mask(positions, window), kv, in_window, True),
        (values, flex._entry_block_mask(positions, entries), entries.values, seen, False),
    ]
    with torch.no_grad():
        for keys, block_mask, dense_keys, allowed, gqa in calls:
            out = compiled(q.transpose(1, 2), keys, keys, block_mask=block_mask, enable_gqa=gqa)
            expected = dense_attention(q, dense_keys, allowed)
            torch.testing.assert_close(out.transpose(1, 2), expected, rtol=1e-5, atol=1e-5)
