"""Multi-token prediction: target alignment per depth, loss composition, accounting."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from birkhoff.errors import RecipeError
from birkhoff.model import ModelConfig, build_model
from birkhoff.model.budget import count_parameters
from birkhoff.model.config import MoEConfig, MTPConfig
from birkhoff.model.context import SequenceContext
from birkhoff.model.mtp import mtp_loss
from conftest import small_model

VOCAB = 7


class EchoEmbedding(nn.Module):
    """A stand-in depth k: checks the length it is given and echoes the embedding."""

    def __init__(self, k: int, seq: int) -> None:
        super().__init__()
        self.expected_length = seq - k

    def forward(self, hidden, next_embeddings, ctx, tokens):
        assert hidden.shape[1] == next_embeddings.shape[1] == self.expected_length
        assert ctx.cos.shape[0] == self.expected_length
        return next_embeddings, None

    def hidden(self, residual):
        return residual


def identity_head_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A head that passes its input through as the logits, and their cross-entropy."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def predicts_successor(tokens: torch.Tensor) -> torch.Tensor:
    """An 'embedding' whose logits confidently predict token + 1."""
    return 50.0 * F.one_hot((tokens + 1) % VOCAB, VOCAB).float()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_depth_k_reads_token_i_plus_k_and_predicts_token_i_plus_k_plus_1(depth):
    seq = 6
    depths = nn.ModuleList(EchoEmbedding(k, seq) for k in range(1, depth + 1))
    rope = SequenceContext(torch.zeros(seq, 2), torch.zeros(seq, 2))
    hidden = torch.zeros(1, seq, VOCAB)
    counting = (torch.arange(seq) % VOCAB).unsqueeze(0)  # t_{j+1} = t_j + 1
    # Depth k is fed Emb(t_{i+k}) and scored on t_{i+k+1}: perfect on a counting sequence...
    loss, _ = mtp_loss(
        depths, hidden, counting, predicts_successor(counting), identity_head_loss, rope
    )
    assert loss < 1e-6
    # ...and wrong whenever the next token is not the successor (any other offset fails).
    for step in (2, 3):
        skipping = (torch.arange(seq) * step % VOCAB).unsqueeze(0)
        embedded = predicts_successor(skipping)
        assert mtp_loss(depths, hidden, skipping, embedded, identity_head_loss, rope)[0] > 10


def config(depth: int, weight: float = 0.3) -> ModelConfig:
    return small_model(
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
    assert model.mtp[1].hidden_proj.weight.grad.abs().sum() > 0


def test_a_depth_is_a_full_block_over_every_stream_as_v4_writes_it():
    """Depth 1 of an mHC + MoE model against V4's MTPBlock written out with torch functions:
    x = h_proj(hnorm(h)) + e_proj(enorm(Emb(t_{i+1}))) on each of the main model's last n
    streams (not its readout), the block, the depth's own readout and norm, the shared head."""
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=16, seq_aux_loss_coef=0.1)
    model = build_model(dataclasses.replace(config(depth=1, weight=1.0), moe=moe))
    assert model.cfg.residual.mode == "mhc"
    depth = model.mtp[0]
    tokens, targets = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        for param in depth.parameters():  # norms off 1, so a swapped norm shows
            param.add_(0.1 * torch.randn_like(param))
        ctx = model.context(12, None, None)
        streams, main_aux = model.run_blocks(model.embed(tokens), tokens, ctx)
        main = F.cross_entropy(model.logits(streams).flatten(0, 1), targets.flatten())

        def norm(x, module):
            return F.rms_norm(x, (x.shape[-1],), module.weight, model.cfg.norm_eps)

        h = F.linear(norm(streams[:, :11], depth.hidden_norm), depth.hidden_proj.weight)
        e = norm(model.embedding(targets[:, :11]), depth.embed_norm)
        x = h + F.linear(e, depth.embed_proj.weight)[:, :, None, :]
        x, mtp_aux = depth.block(x, targets[:, :11], ctx.truncated(11))
        hidden = norm(depth.readout(x), depth.norm)
        mtp = F.cross_entropy(model.head(hidden).flatten(0, 1), targets[:, 1:].flatten())
        expected = main + sum(main_aux) + mtp + mtp_aux
        torch.testing.assert_close(model(tokens, targets), expected)
    model(tokens, targets).backward()
    moe = depth.block.ffn
    assert moe.experts.w_up.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0


def test_negative_depth_and_zero_weight_are_rejected():
    with pytest.raises(RecipeError, match=r"model\.mtp\.depth"):
        build_model(config(depth=-1))
    with pytest.raises(RecipeError, match=r"model\.mtp\.loss_weight"):
        build_model(config(depth=1, weight=0.0))
