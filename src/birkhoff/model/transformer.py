"""Decoder-only transformer: embedding, pre-norm blocks, final norm, output head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from birkhoff.model.attention import Attention
from birkhoff.model.config import ModelConfig
from birkhoff.model.mlp import SwiGLU
from birkhoff.model.norm import RMSNorm
from birkhoff.model.rope import rope_tables


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel_backend: str) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, kernel_backend)
        self.attention = Attention(cfg, kernel_backend)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, kernel_backend)
        self.ffn = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel_backend: str = "reference") -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, kernel_backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, kernel_backend)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embedding.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); with `targets`, the mean next-token loss.

        The loss is computed inside forward so that data-parallel wrappers see one call.
        """
        seq = tokens.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, std) for inputs; output projections scaled by 1/sqrt(2 * layers) (GPT-2)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            is_output_projection = name.endswith(("attention.wo.weight", "ffn.w_down.weight"))
            nn.init.normal_(param, mean=0.0, std=out_std if is_output_projection else std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)


def build_model(cfg: ModelConfig, kernel_backend: str = "reference") -> Transformer:
    """Validate the config, construct the model and initialise its weights."""
    cfg.validate()
    model = Transformer(cfg, kernel_backend)
    model.init_weights()
    return model
