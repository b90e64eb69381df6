"""Build a model on the meta device (no memory) and describe its parameter split."""

from __future__ import annotations

import torch

from birkhoff.model.budget import ParameterCount, apply_sparse_budget, count_parameters
from birkhoff.model.config import ModelConfig
from birkhoff.model.transformer import Transformer


def build_on_meta(cfg: ModelConfig) -> Transformer:
    """The model of `cfg` with meta tensors: shapes and counts without allocating weights."""
    cfg.validate()
    with torch.device("meta"):
        return Transformer(apply_sparse_budget(cfg))


def describe_split(cfg: ModelConfig) -> str:
    """One line: total / active / Engram / routed-expert parameters of a sized config (the
    `cfg` of a built model, after the sparse budget was applied)."""
    count: ParameterCount = count_parameters(cfg)
    return (
        f"parameters: total {count.total:,} | active {count.active:,} | "
        f"engram tables {count.engram_tables:,} | routed experts {count.routed_experts:,} "
        f"({cfg.moe.num_experts} experts, top-{cfg.moe.top_k}; engram table_size "
        f"{cfg.engram.table_size} x {len(cfg.engram.layers)} layer(s))"
    )
