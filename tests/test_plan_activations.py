"""The planner's activation terms (parallel/planning/activations.py, written per saved tensor)
against what autograd really saves in one forward of the model: every saved tensor's
storage counted once through saved-tensor hooks, parameters and buffers left out. Several
shapes, so that terms which coincide in one (n C and heads x head_dim are both 256 in the
layout tests' model) are told apart in another."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_parallel import MODEL

from birkhoff.kernels import indexer_loss, v4_attention
from birkhoff.launch.recipe import typed_recipe
from birkhoff.model import build_model
from birkhoff.model.budget import apply_sparse_budget
from birkhoff.model.config import AttentionConfig, ModelConfig
from birkhoff.model.context import SequenceContext
from birkhoff.model.v4_attention import V4Attention
from birkhoff.parallel.planning import activations
from birkhoff.parallel.planning.activations import (
    block_terms,
    bytes_per_token,
    head_terms,
    head_weight_gradient_bytes,
)
from conftest import SMALL_OVERRIDES, compose_recipe, saved_bytes

BATCH = 4
SHAPES = {
    "V4 tiny of the layout tests": [],
    "other widths": [
        "model.hidden_size=96",
        "model.residual.n_streams=2",
        "model.residual.sinkhorn_iters=10",
        "model.num_heads=2",
        "model.attention.head_dim=48",
        "model.attention.q_lora_rank=80",
        "model.attention.o_groups=1",
        "model.attention.o_lora_rank=40",
        "model.attention.sliding_window=8",
        "model.attention.index_heads=2",
        "model.attention.index_head_dim=24",
        "model.attention.index_topk=3",
        "model.moe.top_k=3",
        "model.moe.expert_ffn_hidden_size=40",
        "model.engram.embed_dim=6",
        "model.engram.heads_per_order=4",
    ],
    "hyper-connections": ["model.residual.mode=hc", "model.residual.form=paper"],
    "plain residual": ["model.residual.mode=plain", "model.residual.form=paper"],
    "grouped-query attention": ["model=tiny_gqa"],
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_activation_terms_are_what_autograd_saves(shape):
    recipe = typed_recipe(compose_recipe([*SMALL_OVERRIDES, *MODEL, *SHAPES[shape]]))
    cfg, seq = recipe.model, recipe.data.seq_len
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    sized = apply_sparse_budget(cfg)
    tokens = torch.randint(0, sized.vocab_size, (BATCH, seq))
    layers = range(sized.num_layers + sized.mtp.depth)
    per_token = sum(
        bytes_per_token(block_terms(sized, layer, seq, 4), 1, False, "all") for layer in layers
    )
    per_token += bytes_per_token(head_terms(sized, 4), 1, False, "all")
    predicted = per_token * BATCH * seq + head_weight_gradient_bytes(sized, 4)
    assert predicted == pytest.approx(saved_bytes(model, tokens, tokens.roll(-1, dims=1)), rel=0.03)


CSA_LAYER = AttentionConfig(
    kind="v4", head_dim=32, rope_head_dim=8, q_lora_rank=48, o_groups=2, o_lora_rank=24,
    sliding_window=8, csa_ratio=4, hca_ratio=8, index_heads=2, index_head_dim=16,
    index_topk=8, layer_types=["csa"],
)  # fmt: skip


def test_a_tensor_parallel_rank_takes_csa_in_the_form_its_heads_decide(monkeypatch):
    """CSA gathers its picks or masks every entry, whichever keeps less per query, and the kernel
    decides with the heads it holds. A layer of 4 query heads and 2 indexer heads (64 entries, 8
    picks) gathers; one rank of tp=2 holds half of them (and half the output groups) and masks.
    That half layer run as the kernel decides keeps exactly what it keeps forced into the mask,
    not the gather; the plan at tp=2 is the plan forced into the mask (with the layer's 4 heads
    it would gather)."""
    seq, hidden = 256, 64
    whole = CSA_LAYER
    rank = dataclasses.replace(whole, index_heads=1, o_groups=1)
    x = torch.randn(2, seq, hidden, generator=torch.Generator().manual_seed(0))
    cfg = ModelConfig(hidden_size=hidden, num_heads=4, num_layers=1, attention=whole)

    def kept(form: bool | None) -> int:
        with monkeypatch.context() as patches:
            if form is not None:
                for module in (v4_attention, indexer_loss):
                    patches.setattr(module, "picks_as_mask", lambda *_: form)
            torch.manual_seed(0)
            layer = V4Attention(hidden, 2, rank, "csa", 1e-6, 10000.0)
            return saved_bytes(layer, x, SequenceContext(), [])

    def planned(form: bool | None) -> float:
        with monkeypatch.context() as patches:
            if form is not None:
                patches.setattr(activations, "picks_as_mask", lambda *_: form)
            return bytes_per_token(block_terms(cfg, 0, seq, 4, tp=2), 2, False, "all")

    gathered, masked = kept(False), kept(True)
    assert gathered != masked
    assert kept(None) == masked
    assert planned(None) == planned(True) != planned(False)


@pytest.mark.parametrize("layer_type", ["sliding", "hca", "csa"])
@pytest.mark.parametrize(
    "dtype, tp", [(torch.float32, 1), (torch.bfloat16, 1), (torch.bfloat16, 2)]
)
def test_the_npu_attention_terms_are_what_its_layer_keeps_less(monkeypatch, layer_type, dtype, tp):
    """A V4 layer whose attention runs the npu backend's operator (a stand-in keeping what
    torch_npu's autograd node keeps) keeps, against the same layer on the reference kernels,
    the plan's difference between its npu and reference terms: the reference op's own tensors
    (reference_core_terms) out, the operator's blocks (npu_core_terms) in. At tp=2 a rank's
    half of the heads (and of the indexer heads and output groups) against the plan's
    per-rank figure."""
    import sys

    from test_npu_v4_attention import _SavingStandIn

    from birkhoff.kernels import npu_v4_attention

    monkeypatch.setitem(sys.modules, "torch_npu", _SavingStandIn())
    seq, hidden, act = 64, 64, dtype.itemsize
    cfg = ModelConfig(hidden_size=hidden, num_heads=4, num_layers=1, attention=dataclasses.replace(
        CSA_LAYER, layer_types=[layer_type]))  # fmt: skip
    x = torch.randn(2, seq, hidden, generator=torch.Generator().manual_seed(0), dtype=dtype)

    rank = dataclasses.replace(cfg.attention, index_heads=2 // tp, o_groups=2 // tp)

    def kept(npu: bool) -> int:
        torch.manual_seed(0)
        layer = V4Attention(hidden, 4 // tp, rank, layer_type, 1e-6, 10000.0).to(dtype)
        if npu:
            layer._attend = npu_v4_attention.v4_attention
        return saved_bytes(layer, x, SequenceContext(), [])

    def planned(attention: str) -> float:
        terms = block_terms(cfg, 0, seq, act, attention, tp=tp)
        return bytes_per_token(terms, tp, False, "all")

    measured = (kept(True) - kept(False)) / (2 * seq)
    assert measured == pytest.approx(planned("npu") - planned("reference"), abs=1e-6)
    assert measured != 0


@pytest.mark.parametrize("tp", [1, 2])
def test_the_npu_gathered_csa_terms_are_what_its_layer_keeps_less(monkeypatch, stand_in, tp):
    """A bfloat16 CSA layer gathering its picks, its attention in npu_sparse_flash_attention
    (through the stand-in), keeps against the same layer on the reference kernels the plan's
    difference: the reference op's gathered tensors (reference_core_terms at k picks) out,
    the sparse operator's (npu_sparse_core_terms) in; at tp=2 per rank."""
    from birkhoff.kernels import npu_v4_attention

    for module in (v4_attention, indexer_loss, activations):
        monkeypatch.setattr(module, "picks_as_mask", lambda *_: False)
    seq, hidden, dtype = 64, 64, torch.bfloat16
    wide = dataclasses.replace(CSA_LAYER, head_dim=512)  # the operator's only width
    cfg = ModelConfig(hidden_size=hidden, num_heads=4, num_layers=1, attention=wide)
    x = torch.randn(2, seq, hidden, generator=torch.Generator().manual_seed(0), dtype=dtype)
    rank = dataclasses.replace(cfg.attention, index_heads=2 // tp, o_groups=2 // tp)

    def kept(npu: bool) -> int:
        torch.manual_seed(0)
        layer = V4Attention(hidden, 4 // tp, rank, "csa", 1e-6, 10000.0).to(dtype)
        if npu:
            layer._attend = npu_v4_attention.v4_attention
        return saved_bytes(layer, x, SequenceContext(), [])

    def planned(attention: str) -> float:
        terms = block_terms(cfg, 0, seq, dtype.itemsize, attention, tp=tp)
        return bytes_per_token(terms, tp, False, "all")

    # the reference's gather also keeps its batch rows' index (B int64), no per-token term
    measured = (kept(True) - kept(False) + 2 * 8) / (2 * seq)
    assert "npu_sparse_flash_attention" in stand_in.calls
    assert measured == pytest.approx(planned("npu") - planned("reference"), abs=1e-6)
    assert measured != 0


@pytest.mark.parametrize("masked", [True, False])
def test_the_npu_indexer_loss_terms_are_what_its_layer_keeps_less(monkeypatch, masked):
    """A bfloat16 CSA layer at the indexer operator's widths (8 heads of 512, 8 indexer heads
    of 128) with its attention and its indexer's loss on the npu backend (stand-ins keeping
    what torch_npu's autograd keeps) against the same layer on the reference kernels: the
    plan's difference, the reference indexer loss's own tensors (reference_indexer_loss_terms,
    its scores at every entry or at the gathered picks) out, the operator's gradients
    (npu_indexer_loss_terms) in."""
    import sys

    from test_npu_v4_attention import _SavingStandIn

    from birkhoff.kernels import npu_indexer_loss, npu_v4_attention

    monkeypatch.setitem(sys.modules, "torch_npu", _SavingStandIn())
    # the indexer's scores in either form, the attention's picks as a mask (its own rule here)
    monkeypatch.setattr(activations, "picks_as_mask", lambda *args: masked or args[3] == 512)
    monkeypatch.setattr(indexer_loss, "picks_as_mask", lambda *_: masked)
    seq, hidden, dtype = 64, 64, torch.bfloat16
    wide = dataclasses.replace(
        CSA_LAYER, head_dim=512, rope_head_dim=64, index_heads=8, index_head_dim=128, index_topk=3
    )
    cfg = ModelConfig(hidden_size=hidden, num_heads=8, num_layers=1, attention=wide)
    x = torch.randn(2, seq, hidden, generator=torch.Generator().manual_seed(0), dtype=dtype)

    def kept(npu: bool) -> int:
        torch.manual_seed(0)
        layer = V4Attention(hidden, 8, wide, "csa", 1e-6, 10000.0).to(dtype)
        if npu:
            layer._attend = npu_v4_attention.v4_attention
            layer._indexer_loss = npu_indexer_loss.indexer_loss
        return saved_bytes(layer, x, SequenceContext(), [])

    def planned(attention: str) -> float:
        return bytes_per_token(block_terms(cfg, 0, seq, 2, attention), 1, False, "all")

    # no per-token terms: the operator's count of queries (a float32 scalar), the reference's
    # (an int64 scalar) and, gathered, its batch rows' index (B int64)
    measured = (kept(True) - kept(False) - 4 + 8 + (0 if masked else 2 * 8)) / (2 * seq)
    assert "npu_sparse_lightning_indexer_grad_kl_loss" in sys.modules["torch_npu"].calls
    assert measured == pytest.approx(planned("npu") - planned("reference"), abs=1e-6)
    assert measured < 0
