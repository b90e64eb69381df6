"""The CSA indexer's loss as an op (kernels/indexer_loss.py): the reference against a
per-query float64 loop written from the formulas (V3.2 §2.1), in both of its forms; the npu
backend (kernels/npu_indexer_loss.py) through the stand-in torch_npu whose
npu_sparse_lightning_indexer_grad_kl_loss computes its docs' formula (tests/npu_stand_in.py)
against the same loop, the lists it is handed written out, the calls it leaves to the
reference, and a bf16 CSA layer's indexer gradients against the reference backend's."""

from __future__ import annotations

import math

import pytest
import torch

from birkhoff import kernels
from birkhoff.kernels import indexer_loss as index_kernels
from birkhoff.kernels import npu_indexer_loss
from birkhoff.kernels.indexer_loss import indexer_loss
from birkhoff.model.compression import block_entries

OPERATOR = "npu_sparse_lightning_indexer_grad_kl_loss"


def loop_loss(q, values, lse, index_q, index_keys, index_weights, picks, picked):
    """Mean over queries with a visible pick of KL(p || softmax(I)) over those picks: p the
    attention's probability of each pick summed over heads and renormalised, I = sum_h
    w_h ReLU(q_I,h . k_I) / sqrt(d_I); one query at a time, in float64."""
    batch, seq, _, dim = q.shape
    total, counted = 0.0, 0
    for b in range(batch):
        for t in range(seq):
            rows = picks[b, t][picked[b, t]]
            if rows.numel() == 0:
                continue
            logits = q[b, t].double() @ values[b, rows].double().T / math.sqrt(dim)
            mass = torch.exp(logits - lse[b, t].double()[:, None]).sum(0)
            p = mass / mass.sum()
            scores = torch.relu(index_q[b, t] @ index_keys[b, rows].T) / math.sqrt(
                index_q.shape[-1]
            )
            index = index_weights[b, t] @ scores
            total = total + (p * (p.log() - torch.log_softmax(index, 0))).sum()
            counted += 1
    return total / counted


def csa_case(seq, heads, dim, index_heads, index_dim, topk, seed=0, dtype=torch.float64, ratio=4):
    """A CSA layer's tensors for `seq` tokens in two documents (blocks of `ratio`): the attention's
    queries, entries and a normaliser, the indexer's queries, keys and weights, and each
    query's random visible picks (fewer where fewer are visible; the first query none)."""
    generator = torch.Generator().manual_seed(seed)
    split = seq // 3
    positions = torch.cat((torch.arange(split), torch.arange(seq - split)))[None]
    layout = block_entries(positions, ratio)
    entries = layout.start.shape[1]

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    q, values = draw(1, seq, heads, dim), draw(1, entries, dim)
    logits = torch.einsum("bthd,bed->bthe", q.double(), values.double()) / math.sqrt(dim)
    lse = (logits.amax(-1) + 1 + torch.rand(1, seq, heads, generator=generator)).float()
    scores = torch.rand(1, seq, entries, generator=generator)
    top = scores.masked_fill(~layout.visible(positions), -1).topk(min(topk, entries), dim=-1)
    index = [draw(1, seq, index_heads, index_dim), draw(1, entries, index_dim)]
    weights = draw(1, seq, index_heads)
    return [q, values, lse, *index, weights, top.indices, top.values >= 0]


def gradients(op, args, dtype):
    """The op's loss and its gradients in the indexer's queries, keys and weights."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in args[3:6]]
    loss = op(*args[:3], *leaves, *args[6:])
    return loss, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("form", ["mask", "gathered"])
def test_the_reference_equals_a_per_query_loop(form, monkeypatch):
    """Both ways of scoring the picks (every entry read at the picks, or the picked keys
    gathered): loss and gradients to 1e-6 of the loop's (float64 but the target's mass, which
    `entry_mass` sums in float32)."""
    monkeypatch.setattr(index_kernels, "picks_as_mask", lambda *_: form == "mask")
    args = csa_case(seq=30, heads=3, dim=8, index_heads=2, index_dim=5, topk=4)
    assert not args[-1][0, 0].any() and args[-1].any(-1).sum() > 20  # one query picks nothing
    got, got_grads = gradients(indexer_loss, args, torch.float64)
    exact, exact_grads = gradients(loop_loss, args, torch.float64)
    assert relative(got, exact) < 1e-6
    for value, expected in zip(got_grads, exact_grads, strict=True):
        assert relative(value, expected) < 1e-6


def bf16_case(seed=0, ratio=4):
    """The operator's shape: 8 heads of 512 channels, 8 indexer heads of 128; the attention's
    tensors bf16 (autocast's), the indexer's float32 (as the model hands them)."""
    args = csa_case(48, 8, 512, 8, 128, topk=5, seed=seed, ratio=ratio)
    return [args[0].bfloat16(), args[1].bfloat16(), *args[2:3], *(t.float() for t in args[3:6]),
            *args[6:]]  # fmt: skip


def as_the_operator_reads(args):
    """The indexer's queries and keys rounded to bf16, as the operator takes them: which
    scores ReLU passes is decided on those (float32's would differ near 0, where a pick's
    gradient flips whole)."""
    return [t.bfloat16().float() if i in (3, 4) else t for i, t in enumerate(args)]


def relative(got, exact):
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("ratio", [4, 2])
def test_npu_indexer_loss_is_one_operator_call_within_bf16_rounding(stand_in, ratio):
    """Against the loop on the inputs as the operator takes them (the attention's bf16, the
    indexer's queries and keys rounded to bf16): it hands back bf16 gradients, so loss and
    gradients within bf16's rounding (2^-7); the float32 reference stays within 1e-5 there,
    so the bound is the operator's dtype, not the case. Blocks of 2 tokens too: the causal
    mode's tightest case (entry 0 at row 1, first seen by query 1; the stand-in asserts no
    listed row lies past its query)."""
    args = bf16_case(ratio=ratio)
    got, got_grads = gradients(kernels.get("indexer_loss", "npu"), args, torch.float32)
    assert stand_in.calls == [OPERATOR]
    exact, exact_grads = gradients(loop_loss, as_the_operator_reads(args), torch.float64)
    reference, reference_grads = gradients(indexer_loss, as_the_operator_reads(args), torch.float32)
    assert got.dtype == torch.float32 and relative(got, exact) < 2**-7
    assert relative(reference, exact) < 1e-5
    for value, expected, ours in zip(got_grads, exact_grads, reference_grads, strict=True):
        assert value.dtype == torch.float32
        assert relative(value, expected) < 2**-7
        assert relative(ours, expected) < 1e-5


def test_the_lists_the_operator_reads():
    """Written out: a query's visible picks as key rows (entry e at row e + 1) first, -1
    after; a query with none lists the zero row 0 alone."""
    picks = torch.tensor([[[3, 1, 0, 6], [2, 5, 4, 0]]])
    picked = torch.tensor([[[True, False, True, True], [False, False, False, False]]])
    listed, has_picks = npu_indexer_loss.pick_rows(picks, picked)
    assert listed.dtype == torch.int32 and listed.shape == (1, 2, 1, 4)
    assert listed[:, :, 0].tolist() == [[[4, 1, 7, -1], [0, -1, -1, -1]]]
    assert has_picks.tolist() == [[True, False]]


def test_a_query_with_no_pick_adds_nothing(stand_in):
    """The zero row with softmax_max 0 gives a query without picks a loss and gradients of
    exactly 0, and the mean counts only queries with picks: the same loss and gradients
    with the first half of the queries picking nothing as the loop without them."""
    args = bf16_case(seed=1)
    args[-1] = args[-1].clone()
    args[-1][:, :24] = False
    got, got_grads = gradients(kernels.get("indexer_loss", "npu"), args, torch.float32)
    exact, exact_grads = gradients(loop_loss, as_the_operator_reads(args), torch.float64)
    assert relative(got, exact) < 2**-7
    assert got_grads[0][:, :24].abs().max() == 0 and got_grads[2][:, :24].abs().max() == 0
    for value, expected in zip(got_grads, exact_grads, strict=True):
        assert relative(value, expected) < 2**-7


@pytest.mark.parametrize(
    "change", ["float32", "6 heads", "64 channels", "entries >= tokens", "no entries"]
)
def test_what_the_operator_does_not_take_runs_the_reference(stand_in, change):
    """Outside the operator's limits (its README's, LIMITS in the table) no operator call, and
    the loss is the loop's (0 where nothing is picked)."""
    args = bf16_case()
    if change == "float32":
        args[0], args[1] = args[0].float(), args[1].float()
    elif change == "6 heads":
        args[0], args[2] = args[0][:, :, :6], args[2][:, :, :6]
    elif change == "64 channels":
        args[0], args[1] = args[0][..., :64], args[1][..., :64]
    elif change == "entries >= tokens":
        args = [t[:, :8] if i in (0, 2, 3, 5, 6, 7) else t for i, t in enumerate(args)]
        args[-2] = args[-2].clamp(max=7)  # 12 entries, 8 tokens
    else:  # fewer tokens than a block: no entry, no pick (the loss is 0)
        args = [
            t[:, :0] if i in (1, 4) else t[..., :0] if i >= 6 else t for i, t in enumerate(args)
        ]
    got = kernels.get("indexer_loss", "npu")(*args)
    assert stand_in.calls == []
    if change == "no entries":
        assert got.item() == 0
    else:
        assert relative(got, loop_loss(*args)) < 1e-5


def test_a_bf16_csa_layer_trains_its_indexer_through_the_operator(stand_in):
    """A CSA layer with the operator's widths under bf16 autocast: its indexer's loss and
    the gradients of the indexer's weights (the only ones the loss trains) on the npu backend
    against the reference backend's, within the rounding of the indexer's queries and keys
    to bf16 (the operator's inputs; the reference scores in float32)."""
    from birkhoff.model.config import AttentionConfig
    from birkhoff.model.context import SequenceContext
    from birkhoff.model.v4_attention import V4Attention

    cfg = AttentionConfig(
        kind="v4", head_dim=512, rope_head_dim=64, q_lora_rank=48, o_groups=2, o_lora_rank=24,
        sliding_window=8, csa_ratio=4, index_heads=8, index_head_dim=128, index_topk=3,
    )  # fmt: skip
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(2))
    results = []
    for backend in ("reference", "npu"):
        torch.manual_seed(0)
        layer = V4Attention(64, 8, cfg, "csa", 1e-6, rope_theta=10000.0, backend=backend)
        losses: list[torch.Tensor] = []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x, SequenceContext(), losses)
        losses[0].backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        assert grads and all(n.startswith("indexer.") for n in grads)
        results.append((losses[0].detach(), grads))
    assert stand_in.calls.count(OPERATOR) == 1
    (loss_ref, grads_ref), (loss_got, grads_got) = results
    assert abs(loss_got - loss_ref) < 1e-3  # of 0.041: the scores' bf16 rounding
    for name, grad in grads_ref.items():  # cosine 0.9998-0.9999 here, norms within 1%
        cosine = torch.nn.functional.cosine_similarity(grads_got[name].flatten(), grad.flatten(), 0)
        assert cosine > 0.999, name
        torch.testing.assert_close(grads_got[name].norm(), grad.norm(), rtol=2e-2, atol=0)


def test_a_bf16_v4_model_runs_both_csa_operators_and_trains_as_the_reference(stand_in, monkeypatch):
    """A V4 model (sliding, CSA, HCA) at the operators' widths under bf16 autocast, CSA's picks
    gathered: its attention in npu_sparse_flash_attention and its indexer's loss in
    npu_sparse_lightning_indexer_grad_kl_loss, forward and backward. Against the reference
    backend's: the loss, and the gradients' direction both of all parameters (cosine above
    0.998, as for the attention's operator alone) and of the indexer's alone, which are too
    small a part of the whole for its cosine to notice them (above 0.995: 0.9978 here, where
    one CSA layer alone gives 0.9998; negated, they give -1 and the whole's cosine still
    passes)."""
    import dataclasses

    from test_hf_parity import v4_config
    from test_v4_attention import force_csa_form

    from birkhoff.model import build_model

    force_csa_form(monkeypatch, "gather")
    cfg = v4_config()
    wide = dict(head_dim=512, rope_head_dim=64, index_heads=8, index_head_dim=128)
    cfg = dataclasses.replace(
        cfg, num_heads=8, attention=dataclasses.replace(cfg.attention, **wide)
    )
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(5))
    results = []
    for backend in ("reference", "npu"):
        model = build_model(cfg, backend, seed=3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        named = [(n, p.grad.flatten()) for n, p in model.named_parameters() if p.grad is not None]
        indexer = torch.cat([g for n, g in named if ".indexer." in n])
        results.append((loss.detach(), torch.cat([g for _, g in named]), indexer))
    operators = {OPERATOR, "npu_sparse_flash_attention", "npu_sparse_flash_attention_grad"}
    assert operators <= set(stand_in.calls)
    (loss_ref, all_ref, indexer_ref), (loss_got, all_got, indexer_got) = results
    torch.testing.assert_close(loss_got, loss_ref, rtol=1e-2, atol=1e-2)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(all_got, all_ref, dim=0) > 0.998
    assert cosine(indexer_got, indexer_ref, dim=0) > 0.995
    torch.testing.assert_close(indexer_got.norm(), indexer_ref.norm(), rtol=2e-2, atol=0)
