import pytest
import torch

from birkhoff.errors import RecipeError
from birkhoff.model import ModelConfig, build_model
from birkhoff.model.config import ResidualConfig
from conftest import small_model

CFG = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=64,
    max_seq_len=16,
)


def test_logits_shape_and_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    model = build_model(CFG)
    tokens = torch.randint(0, 97, (3, 16))
    assert model(tokens).shape == (3, 16, 97)
    loss = model(tokens, tokens)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.1


def test_attention_is_causal():
    torch.manual_seed(0)
    model = build_model(CFG)
    tokens = torch.randint(0, 97, (1, 16))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 97
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_tied_embeddings_share_one_tensor():
    model = build_model(ModelConfig(**{**CFG.__dict__, "tie_embeddings": True}))
    assert model.head.weight is model.embedding.weight


def test_output_projections_get_the_depth_scaled_init():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(**{**CFG.__dict__, "num_layers": 8, "hidden_size": 256, "ffn_hidden_size": 512})
    )
    assert abs(model.blocks["0"].attention.wq.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks["0"].attention.wo.weight.std().item() - 0.02 / 4) < 0.001


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"num_heads": 5}, "model.num_heads"),
        ({"num_kv_heads": 3}, "model.num_kv_heads"),
        ({"hidden_size": 0}, "model.hidden_size"),
        ({"residual": ResidualConfig(n_streams=0)}, "model.residual.n_streams"),
        ({"residual": ResidualConfig(mode="dense")}, "model.residual.mode"),
        ({"hidden_size": 12, "num_heads": 4}, "model.num_heads"),  # odd head_dim: no RoPE pairs
    ],
)
def test_bad_shapes_fail_at_build_time_naming_the_field(change, key):
    with pytest.raises(RecipeError) as info:
        build_model(ModelConfig(**{**CFG.__dict__, **change}))
    assert info.value.key == key


def test_document_mask_makes_a_packed_document_see_only_itself():
    """With positions that restart at a document start, the second document of a packed
    sequence gets the same logits as when it is run alone (attention and rotary positions)."""
    torch.manual_seed(0)
    model = build_model(small_model(max_seq_len=12, residual=ResidualConfig(mode="plain")))
    first, second = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 7))
    packed = torch.cat((first, second), 1)
    positions = torch.cat((torch.arange(5), torch.arange(7))).unsqueeze(0)
    alone = model(second)
    masked = model(packed, positions=positions)
    torch.testing.assert_close(masked[:, 5:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(packed)[:, 5:], alone, atol=1e-3)  # unmasked: sees doc 1


def test_tensor_parallel_plan_with_sequence_parallelism():
    """Between sublayers the residual holds a slice of the sequence: each sublayer gathers its
    input and reduce-scatters its row-parallel output (the shared experts along flattened
    tokens); Engram runs whole; without sequence parallelism inputs and outputs stay whole."""
    from birkhoff.launch.recipe import load_recipe
    from conftest import compose_recipe

    recipe, _ = load_recipe(compose_recipe(["model=tiny_gqa"]), env={})
    model = build_model(recipe.model)
    dense, moe_with_engram = model.blocks["0"], model.blocks["1"]
    assert dense.tensor_parallel_plan(True) == {
        "attention": "gather_seq",
        "attention.wq": "colwise",
        "attention.wk": "colwise",
        "attention.wv": "colwise",
        "attention.wo": "rowwise_seq",
        "ffn": "gather_seq",
        "ffn.w_gate": "colwise",
        "ffn.w_up": "colwise",
        "ffn.w_down": "rowwise_seq",
    }
    plan = moe_with_engram.tensor_parallel_plan(True)
    assert plan["ffn.shared"] == "gather_tokens" and plan["ffn.shared.w_down"] == "rowwise_tokens"
    assert plan["engram"] == "whole_seq" and "ffn" not in plan
    whole = moe_with_engram.tensor_parallel_plan()
    assert set(whole.values()) == {"colwise", "rowwise"}
    assert set(whole) == {name for name, role in plan.items() if role.startswith(("col", "row"))}
