"""The planner's activation terms (parallel/planning/activations.py, written per saved tensor)
against what autograd really saves in one forward of the model: every saved tensor's
storage counted once through saved-tensor hooks, parameters and buffers left out. Several
shapes, so that terms which coincide in one (n C and heads x head_dim are both 256 in the
layout tests' model) are told apart in another."""

from __future__ import annotations

import pytest
import torch
from test_parallel import MODEL

from birkhoff.launch.recipe import typed_recipe
from birkhoff.model import build_model
from birkhoff.model.budget import apply_sparse_budget
from birkhoff.parallel.planning.activations import (
    block_terms,
    bytes_per_token,
    head_terms,
    head_weight_gradient_bytes,
)
from conftest import SMALL_OVERRIDES, compose_recipe

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


def saved_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after one forward and loss, each storage once."""
    kept: dict[int, torch.UntypedStorage] = {}  # holding them keeps addresses unique

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        kept.setdefault(storage.data_ptr(), storage)
        return tensor

    state = [*model.parameters(), *model.buffers()]
    own = {t.untyped_storage().data_ptr() for t in state}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens, tokens.roll(-1, dims=1))
    return sum(s.nbytes() for address, s in kept.items() if address not in own)


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
    assert predicted == pytest.approx(saved_bytes(model, tokens), rel=0.03)
