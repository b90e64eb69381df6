"""Kernel launches of one micro-batch's forward and backward in eager mode, counted.

Every aten op that runs a kernel is one launch on an accelerator (views and allocations are
none); in eager PyTorch the host spends about the same time on each (dispatch, autograd,
the launch itself), so a step whose device work is small is bound by the host. How many ops
a model runs does not depend on its widths: the count is taken on a copy of the recipe's
model with every width narrowed (the same layers, layer kinds, experts, streams, Engram
orders and heads, and the recipe's sequence length, on which V4 attention's block loops
depend), one sequence on this CPU, with the reference kernels. tests/test_plan_traffic.py
checks it against the model at its own widths.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from birkhoff.model import build_model
from birkhoff.model.budget import apply_sparse_budget
from birkhoff.model.config import ModelConfig

NO_KERNEL = {"empty", "empty_strided", "empty_like", "lift_fresh", "_local_scalar_dense"}


class LaunchCounter(TorchDispatchMode):
    """Counts the aten ops that run a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL:
            self.launches += 1
        return func(*args, **(kwargs or {}))


def narrowed(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with its sparse budget resolved and every width small: 8 channels a head."""
    cfg = apply_sparse_budget(cfg)
    a, moe, engram = cfg.attention, cfg.moe, cfg.engram
    return replace(
        cfg,
        vocab_size=256,
        hidden_size=8 * cfg.num_heads,
        ffn_hidden_size=32,
        sparse_budget=None,
        attention=replace(
            a, head_dim=16, rope_head_dim=8, q_lora_rank=16, o_lora_rank=16, index_head_dim=16
        ),
        moe=replace(moe, expert_ffn_hidden_size=16),
        engram=replace(engram, table_size=min(engram.table_size, 97), embed_dim=8),
    )


def count_launches(cfg: ModelConfig, seq_len: int, narrow: bool = True) -> int:
    """Kernel launches of one sequence's forward, loss and backward (reference kernels)."""
    model_cfg = narrowed(cfg) if narrow else cfg
    model = build_model(model_cfg, seed=0)
    vocab = apply_sparse_budget(model_cfg).vocab_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, seq_len), generator=generator)
    with LaunchCounter() as counter:
        model(tokens, tokens.roll(-1, dims=1)).backward()
    return counter.launches
