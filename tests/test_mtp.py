"""Multi-token prediction: target alignment per depth, loss composition, accounting."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from birkhoff.errors import RecipeError
from birkhoff.model import ModelConfig, build_model
from birkhoff.model.budget import count_parameters
from birkhoff.model.config import MTPConfig
from birkhoff.model.mtp import mtp_loss

VOCAB = 7


class EchoEmbedding(nn.Module):
    """A stand-in depth whose hidden state is the embedding it was given."""

    def forward(self, hidden, next_embeddings, cos, sin, tokens):
        return next_embeddings


def confident(tokens: torch.Tensor) -> torch.Tensor:
    return 50.0 * F.one_hot(tokens, VOCAB).float()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_depth_k_reads_token_i_plus_k_and_predicts_token_i_plus_k_plus_1(depth):
    depths = nn.ModuleList(EchoEmbedding() for _ in range(depth))
    rope = (torch.zeros(16, 2), torch.zeros(16, 2))
    hidden = torch.zeros(1, 16, VOCAB)
    constant = torch.full((1, 16), 3)
    # Echoing Emb(t_{i+k}) predicts t_{i+k+1}: perfect on a constant sequence...
    assert mtp_loss(depths, hidden, constant, confident, lambda h: h, rope) < 1e-6
    # ...and wrong everywhere when consecutive tokens always differ.
    alternating = (torch.arange(16) % 2).unsqueeze(0)
    assert mtp_loss(depths, hidden, alternating, confident, lambda h: h, rope) > 10


def config(depth: int, weight: float = 0.3) -> ModelConfig:
    return ModelConfig(
        vocab_size=50,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        ffn_hidden_size=32,
        max_seq_len=12,
        mtp=MTPConfig(depth, weight),
    )


def test_loss_is_main_loss_plus_weighted_mtp_loss():
    torch.manual_seed(0)
    model = build_model(config(depth=2, weight=0.5))
    tokens, targets = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    main = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    total = model(tokens, targets)
    assert total > main
    model.cfg.mtp.loss_weight = 0.0
    torch.testing.assert_close(model(tokens, targets), main)


def test_mtp_parameters_are_counted_and_trained():
    torch.manual_seed(0)
    model = build_model(config(depth=2))
    assert count_parameters(model.cfg).total == sum(p.numel() for p in model.parameters())
    model(torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))).backward()
    assert model.mtp[1].proj.weight.grad.abs().sum() > 0


def test_negative_depth_is_rejected():
    with pytest.raises(RecipeError, match=r"model\.mtp\.depth"):
        build_model(config(depth=-1))
