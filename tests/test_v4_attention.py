"""DeepSeek-V4 attention against an independent implementation: transformers' DeepseekV4
attention layer (sliding window, CSA with its lightning indexer, HCA), with the same weights.

Documents packed into one window must come out as if each were run alone (transformers' layer
on the document by itself), and the indexer's loss is checked against a per-query float64 loop.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_train import train_in_process

from birkhoff.checkpoint.contents import read_tensors, tensor_metadata
from birkhoff.checkpoint.hf_deepseek_v4 import ATTENTION
from birkhoff.kernels import indexer_loss, v4_attention
from birkhoff.kernels.indexer_loss import indexer_kl
from birkhoff.model import compression
from birkhoff.model.compression import block_entries, topk_recall
from birkhoff.model.config import AttentionConfig
from birkhoff.model.context import SequenceContext
from birkhoff.model.v4_attention import V4Attention
from conftest import saved_bytes

hf_v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
DeepseekV4Config = pytest.importorskip("transformers").DeepseekV4Config

HIDDEN, HEADS, EPS = 64, 4, 1e-6
CFG = AttentionConfig(
    kind="v4",
    head_dim=32,
    rope_head_dim=8,
    q_lora_rank=48,
    o_groups=2,
    o_lora_rank=24,
    sliding_window=8,
    csa_ratio=4,
    hca_ratio=8,
    index_heads=2,
    index_head_dim=16,
    index_topk=3,
    compress_rope_theta=160000.0,
)
HF_TYPES = {
    "sliding": "sliding_attention",
    "csa": "compressed_sparse_attention",
    "hca": "heavily_compressed_attention",
}
# transformers' parameter names -> ours (the exporter's map, read backwards)
NAMES = {hf_name: name for name, hf_name in ATTENTION.items()}


# YaRN on the compressed layers, with a context short enough that the ramp falls inside the 4
# channel pairs: pair 0 keeps its frequency, pair 1 is on the ramp (its ends rounded outwards,
# so halfway), pairs 2-3 are slowed 4x.
YARN = {"yarn_factor": 4.0, "yarn_original_seq_len": 256}


def hf_config(yarn: bool = False) -> DeepseekV4Config:
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    config = DeepseekV4Config(
        rope_parameters=rope if yarn else None,
        vocab_size=128,
        hidden_size=HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        head_dim=CFG.head_dim,
        partial_rotary_factor=CFG.rope_head_dim / CFG.head_dim,
        q_lora_rank=CFG.q_lora_rank,
        o_groups=CFG.o_groups,
        o_lora_rank=CFG.o_lora_rank,
        sliding_window=CFG.sliding_window,
        compress_rates={
            "compressed_sparse_attention": CFG.csa_ratio,
            "heavily_compressed_attention": CFG.hca_ratio,
        },
        index_n_heads=CFG.index_heads,
        index_head_dim=CFG.index_head_dim,
        index_topk=CFG.index_topk,
        compress_rope_theta=CFG.compress_rope_theta,
        rope_theta=10000.0,
        layer_types=list(HF_TYPES.values()),
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        rms_norm_eps=EPS,
    )
    config._attn_implementation = "eager"
    return config


def pair(
    layer_type: str, seed: int = 0, yarn: bool = False, backend: str = "reference"
) -> tuple[V4Attention, torch.nn.Module]:
    """Ours and transformers' layer with the same random weights (sinks, positional biases and
    norm gains random too, so that none of them is checked only at its initial value)."""
    config = hf_config(yarn)
    theirs = hf_v4.DeepseekV4Attention(config, list(HF_TYPES).index(layer_type)).float()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    cfg = dataclasses.replace(CFG, **YARN) if yarn else CFG
    ours = V4Attention(HIDDEN, HEADS, cfg, layer_type, EPS, rope_theta=10000.0, backend=backend)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            mine.pop(NAMES[name]).copy_(param)
    assert not mine, f"parameters transformers does not have: {sorted(mine)}"
    return ours, theirs


def run_theirs(theirs: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' layer on whole sequences with positions 0..T-1 and its sliding mask."""
    seq = x.shape[1]
    positions = torch.arange(seq)[None].expand(x.shape[0], -1)
    rotary = hf_v4.DeepseekV4RotaryEmbedding(theirs.config)
    embeddings = {kind: rotary(x, positions, layer_type=kind) for kind in ("main", "compress")}
    behind = torch.arange(seq)[:, None] - torch.arange(seq)[None, :]
    allowed = (behind >= 0) & (behind < theirs.config.sliding_window)
    mask = torch.zeros(seq, seq).masked_fill(~allowed, -math.inf)[None, None]
    out, _ = theirs(x, embeddings, positions, mask.expand(x.shape[0], 1, -1, -1))
    return out


def force_csa_form(monkeypatch, form: str) -> None:
    """CSA's attention and indexer take their picks `gathered` or as a `mask` over every
    entry, whatever `picks_as_mask` would decide for the shape."""
    for module in (v4_attention, indexer_loss):
        monkeypatch.setattr(module, "picks_as_mask", lambda *_: form == "mask")


@pytest.mark.parametrize(
    "layer_type, yarn, form",
    [
        ("sliding", False, None),
        ("csa", False, "gathered"),
        ("csa", False, "mask"),
        ("hca", False, None),
        ("csa", True, None),
        ("hca", True, None),
    ],
)
def test_v4_attention_equals_transformers_forward_and_backward(layer_type, yarn, form, monkeypatch):
    """yarn: transformers' YaRN with factor 4 on the compressed layers (the sliding layer has
    none), which moves their output by up to 0.8 (hca) and 1.6 (csa) against plain RoPE.
    CSA in both its forms (the rule's own choice here is the mask)."""
    if form is not None:
        force_csa_form(monkeypatch, form)
    ours, theirs = pair(layer_type, yarn=yarn)
    x = torch.randn(2, 37, HIDDEN, generator=torch.Generator().manual_seed(1))
    assert_equals_transformers(ours, theirs, x)


def assert_equals_transformers(ours: V4Attention, theirs: torch.nn.Module, x: torch.Tensor):
    """Output, input gradient and every parameter gradient of the two layers on `x`."""
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(x_ours, SequenceContext())
    expected = run_theirs(theirs, x_theirs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-5)
    mine = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        target = mine[NAMES[name]]
        if param.grad is None:  # the indexer: only its own loss trains it (in both)
            assert target.grad is None, name
            continue
        assert_gradient_close(target.grad, param.grad, name)


def assert_gradient_close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """A float32 weight gradient sums many tokens' products: its rounding grows with its
    largest entries (3e-5 on entries up to 80 where two float32 RMSNorm backwards sum in
    different orders), so the absolute tolerance is relative to that scale."""
    atol = max(1e-5, 1e-6 * expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=atol, msg=name)


def test_the_indexer_picks_the_same_entries_a_few_queries_at_a_time(monkeypatch):
    """Gathering its picks, selection runs over blocks of queries (memory T x k, not T x E):
    with blocks of 3 queries the layer still equals transformers' (which scores all queries
    at once)."""
    force_csa_form(monkeypatch, "gathered")
    monkeypatch.setattr(compression, "SCORES_PER_BLOCK", 3 * 9 * CFG.index_heads * 2)
    ours, theirs = pair("csa", seed=9)
    x = torch.randn(2, 37, HIDDEN, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, SequenceContext()), run_theirs(theirs, x), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("layer_type", ["sliding", "csa", "hca"])
def test_packed_documents_attend_as_if_alone(layer_type):
    """Three documents in one window (positions restart at 0): each document's outputs equal
    transformers' layer run on that document alone; compressed blocks align with document
    starts, so the 13- and 7-token documents are compressed as they would be by themselves."""
    ours, theirs = pair(layer_type, seed=3)
    lengths = [13, 20, 7]
    x = torch.randn(1, sum(lengths), HIDDEN, generator=torch.Generator().manual_seed(4))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = ours(x, SequenceContext(positions=positions))
        for first, n in zip([0, 13, 33], lengths, strict=True):
            alone = run_theirs(theirs, x[:, first : first + n])
            torch.testing.assert_close(packed[:, first : first + n], alone, rtol=1e-5, atol=1e-5)


def test_entries_are_the_complete_blocks_of_each_document():
    """Expected entries written out by hand for documents of 6, 9 and 3 tokens, ratio 4."""
    positions = torch.cat([torch.arange(6), torch.arange(9), torch.arange(3)])[None]
    entries = block_entries(positions, 4)
    starts = entries.start[entries.exists].tolist()
    assert starts == [0, 6, 10]  # doc 1: tokens 0-3; doc 2: tokens 6-9 and 10-13
    assert entries.has_previous[entries.exists].tolist() == [False, False, True]
    assert entries.position[entries.exists].tolist() == [0, 0, 4]
    visible = entries.visible(positions)[0]
    assert visible[:, 0].nonzero().flatten().tolist() == [3, 4, 5]  # doc 1 from its 4th token
    assert visible[:, 1].nonzero().flatten().tolist() == list(range(9, 15))
    assert visible[:, 2].nonzero().flatten().tolist() == [13, 14]


def test_indexer_loss_equals_a_per_query_float64_loop():
    generator = torch.Generator().manual_seed(5)
    mass = torch.rand(2, 6, 3, generator=generator, dtype=torch.float64)
    index = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    valid = torch.rand(2, 6, 3, generator=generator) > 0.3
    valid[0, 0] = False  # a query that selected nothing visible does not count
    index = index.masked_fill(~valid, -math.inf)
    total, counted = 0.0, 0
    for b in range(2):
        for t in range(6):
            keep = [k for k in range(3) if valid[b, t, k]]
            if not keep:
                continue
            p = [mass[b, t, k].item() for k in keep]
            p = [v / sum(p) for v in p]
            z = [index[b, t, k].item() for k in keep]
            log_norm = math.log(sum(math.exp(v) for v in z))
            total += sum(pi * (math.log(pi) - (zi - log_norm)) for pi, zi in zip(p, z, strict=True))
            counted += 1
    torch.testing.assert_close(indexer_kl(mass, index, valid).item(), total / counted)


def test_the_indexer_loss_trains_the_indexer_and_nothing_else():
    ours, _ = pair("csa", seed=6)
    x = torch.randn(2, 32, HIDDEN, generator=torch.Generator().manual_seed(7))
    losses: list[torch.Tensor] = []
    ours(x, SequenceContext(), losses)
    assert len(losses) == 1 and losses[0].item() > 0
    losses[0].backward()
    trained = {name for name, p in ours.named_parameters() if p.grad is not None}
    assert trained and all(name.startswith("indexer.") for name in trained), trained
    assert "indexer.w_q.weight" in trained and "indexer.w_weights.weight" in trained


def test_recall_counts_the_dense_top_k_entries_the_indexer_picked():
    """Against a per-query loop: dense attention probabilities per head over the visible
    entries, summed over heads; the top min(k, visible) of them; how many are valid picks."""
    generator = torch.Generator().manual_seed(8)
    queries, heads, dim, count, k = 6, 2, 4, 7, 3
    q = torch.randn(queries, heads, dim, generator=generator)
    values = torch.randn(count, dim, generator=generator)
    visible = torch.rand(queries, count, generator=generator) > 0.3
    visible[0] = False  # sees nothing: wants nothing
    visible[1] = torch.arange(count) < 2  # sees fewer entries than k
    picks = torch.stack([torch.randperm(count, generator=generator)[:k] for _ in range(queries)])
    picked = torch.rand(queries, k, generator=generator) > 0.2
    hits, wanted = topk_recall(q, values, visible, picks, picked, scale=0.5)
    expected_hits = expected_wanted = 0
    for s in range(queries):
        seen = [e for e in range(count) if visible[s, e]]
        mass = dict.fromkeys(seen, 0.0)
        for h in range(heads):
            logits = {e: 0.5 * float(q[s, h] @ values[e]) for e in seen}
            total = sum(math.exp(v) for v in logits.values())
            for e in seen:
                mass[e] += math.exp(logits[e]) / total
        want = min(k, len(seen))
        best = sorted(seen, key=lambda e: -mass[e])[:want]
        chosen = {int(picks[s, j]) for j in range(k) if picked[s, j]}
        expected_hits += len(set(best) & chosen)
        expected_wanted += want
    assert (hits.item(), wanted.item()) == (expected_hits, expected_wanted)
    assert 0 < expected_hits < expected_wanted  # neither all nor nothing: the count matters


def test_the_dense_warm_up_equals_top_k_when_k_covers_every_entry():
    """With index_topk at least the number of entries the sparse layer keeps every visible one:
    the dense warm-up must give the same output, indexer loss and gradients (its scores over
    all entries against the scores at all picks)."""
    x = torch.randn(2, 40, HIDDEN, generator=torch.Generator().manual_seed(11))
    results = []
    for dense in (False, True):
        ours, _ = pair("csa", seed=12)
        ours.cfg = dataclasses.replace(CFG, index_topk=64)  # > 40 / csa_ratio entries
        ours.indexer.topk = 64
        ours.dense_indexing = dense
        losses: list[torch.Tensor] = []
        out = ours(x, SequenceContext(), losses)
        (out.square().mean() + losses[0]).backward()
        grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
        results.append((out.detach(), losses[0].detach(), grads))
    (sparse_out, sparse_loss, sparse_grads), (dense_out, dense_loss, dense_grads) = results
    torch.testing.assert_close(dense_out, sparse_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense_loss, sparse_loss, rtol=1e-5, atol=1e-7)
    assert sorted(dense_grads) == sorted(sparse_grads)
    for name, grad in sparse_grads.items():
        torch.testing.assert_close(dense_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_warm_up_steps_train_the_indexers_and_nothing_else(tmp_path):
    """Steps 1-2 of a run with train.indexer_warmup_steps=2 change the indexers' weights and
    nothing else (MoE balancing biases included); step 3 trains everything."""
    overrides = [
        "model.attention.kind=v4",
        "model.attention.layer_types=[csa,hca]",
        "model.attention.sliding_window=16",
        "model.attention.hca_ratio=16",
        "train.steps=3",
        "train.indexer_warmup_steps=2",
        "train.eval_every=0",
        "optim.warmup_steps=0",
        "checkpoint.every=1",
    ]
    train_in_process(tmp_path / "run", overrides)
    steps = [tmp_path / "run" / "checkpoints" / f"step-{s:08d}" for s in (1, 2, 3)]
    names = [n for n in tensor_metadata(steps[0]) if n.startswith("model.")]
    first, second, third = (read_tensors(path, names) for path in steps)
    changed = {n for n in names if not torch.equal(first[n], second[n])}
    indexer = {n for n in names if ".attention.indexer." in n}
    assert changed == indexer, changed ^ indexer
    after = {n for n in names if not torch.equal(second[n], third[n])}
    assert any(".router.bias" in n for n in after) and len(after) > len(indexer)


def test_csa_entry_gradients_keep_their_precision_in_bf16():
    """The gradient of a CSA entry sums over every query that picked it. Gathered in bf16,
    the gather's backward rounded each of those additions to 8 bits (relative error 0.2 at
    1024 tokens, 2.4 on an H200 at 4096 x 64 heads); gathered from float32 it stays at bf16's
    own rounding of the inputs and outputs, as the other gradients do."""
    from birkhoff.kernels.v4_attention import EntryKV, v4_attention

    generator = torch.Generator().manual_seed(0)
    seq, heads, dim, topk = 1024, 2, 32, 128
    positions = torch.arange(seq)[None]
    layout = block_entries(positions, 4)
    q, kv = torch.randn(1, seq, heads, dim, generator=generator), torch.randn(1, seq, dim)
    values = torch.randn(1, layout.start.shape[1], dim, generator=generator)
    sinks = torch.randn(heads, generator=generator)
    score = torch.rand(1, seq, values.shape[1], generator=generator)
    top = score.masked_fill(~layout.visible(positions), -1).topk(topk, dim=-1)

    def entry_gradient(dtype: torch.dtype) -> torch.Tensor:
        leaf = values.to(dtype).requires_grad_()
        entries = EntryKV(leaf, layout, top.indices, top.values >= 0)
        out, _ = v4_attention(q.to(dtype), kv.to(dtype), positions, sinks.to(dtype), 128, entries)
        (grad,) = torch.autograd.grad(out.float().sum(), leaf)
        return grad.double()

    exact, bf16 = entry_gradient(torch.float64), entry_gradient(torch.bfloat16)
    assert ((bf16 - exact).abs().max() / exact.abs().max()).item() < 1e-2


@pytest.mark.parametrize(("seq", "topk"), [(40, 3), (40, 8), (200, 3)])
def test_csa_takes_its_picks_in_the_form_that_keeps_less(seq, topk, monkeypatch):
    """picks_as_mask's choice, per query 2 x heads x entries floats against picks x
    channels + 2 x heads x picks, against what a CSA layer really keeps for backward in
    each form. 10 entries of 4 heads x 32 channels: the mask for 3 and 8 picks (the
    attention's rule: 80 <= 120 and 320; the indexer's, 2 heads x 16 channels: 40 <= 60);
    50 entries, 3 picks: the gather (400 > 120)."""
    cfg = dataclasses.replace(CFG, index_topk=topk)
    x = torch.randn(2, seq, HIDDEN, generator=torch.Generator().manual_seed(4))
    entries = seq // CFG.csa_ratio
    chosen = v4_attention.picks_as_mask(HEADS, entries, topk, CFG.head_dim)
    index_chosen = v4_attention.picks_as_mask(CFG.index_heads, entries, topk, CFG.index_head_dim)
    assert chosen == index_chosen  # one form for both here, so one measurement decides
    kept = {}
    for form in ("gathered", "mask"):
        force_csa_form(monkeypatch, form)
        torch.manual_seed(0)
        layer = V4Attention(HIDDEN, HEADS, cfg, "csa", EPS, rope_theta=10000.0)
        kept[form] = saved_bytes(layer, x, SequenceContext(), [])
    assert (kept["mask"] < kept["gathered"]) == chosen, kept
