"""Parameter accounting and the sparse-parameter budget split between Engram and MoE experts.

Sparse parameters are those a token does not use: routed experts beyond its top-k, and Engram
table rows beyond the one row per hash head it looks up. With `model.sparse_budget` set, the
builder gives `engram_fraction` of the budget to Engram tables (sized first, as primes round
them up) and the rest to routed experts, so the realised split is exact to within one expert.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from birkhoff.errors import RecipeError, require
from birkhoff.model.config import ModelConfig
from birkhoff.model.engram import distinct_primes


@dataclass(frozen=True)
class ParameterCount:
    total: int
    active: int
    engram_tables: int
    routed_experts: int

    @property
    def sparse(self) -> int:
        return self.total - self.active

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "active": self.active,
            "sparse": self.sparse,
            "engram_tables": self.engram_tables,
            "routed_experts": self.routed_experts,
        }


def block_count(cfg: ModelConfig) -> int:
    """The main blocks and one full block per MTP depth (numbered after them)."""
    return cfg.num_layers + cfg.mtp.depth


def moe_layer_count(cfg: ModelConfig) -> int:
    return sum(cfg.moe.is_moe_layer(layer) for layer in range(block_count(cfg)))


def expert_size(cfg: ModelConfig) -> int:
    return 3 * cfg.hidden_size * cfg.moe.expert_ffn_hidden_size


def engram_rows(cfg: ModelConfig) -> int:
    """Table rows of one Engram layer: the sum of its heads' primes."""
    return sum(distinct_primes(cfg.engram.table_size, cfg.engram.hash_heads))


def attention_size(cfg: ModelConfig, layer: int) -> int:
    """Parameters of a block's attention and its input norm."""
    c, a = cfg.hidden_size, cfg.attention
    if a.kind == "gqa":
        return c * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + c
    heads = cfg.num_heads * a.head_dim
    size = c * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * heads  # query path
    size += c * a.head_dim + a.head_dim + cfg.num_heads  # KV entry, its norm, sinks
    size += a.o_lora_rank * heads + a.o_groups * a.o_lora_rank * c  # grouped output
    kind = a.layer_type(layer)
    if kind == "hca":
        size += 2 * c * a.head_dim + a.hca_ratio * a.head_dim + a.head_dim
    if kind == "csa":
        size += 4 * c * a.head_dim + 2 * a.csa_ratio * a.head_dim + a.head_dim
        width = a.index_head_dim
        size += 4 * c * width + 2 * a.csa_ratio * width + width  # the indexer's compressor
        size += a.q_lora_rank * a.index_heads * width + c * a.index_heads
    return size + c


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Exact parameter numbers of `build_model(cfg)`, computed from the config alone."""
    c, n = cfg.hidden_size, cfg.residual.n_streams
    hyper = cfg.residual.mode != "plain"  # (m)HC modules exist even with a single stream
    n = n if hyper else 1
    moe = cfg.moe
    residual = n * c * (2 * n + n * n) + 3 + 2 * n + n * n if hyper else 0
    dense_ffn = 3 * c * cfg.ffn_hidden_size + c
    routed = moe.num_experts * expert_size(cfg)
    moe_ffn = (
        moe.num_experts * c
        + routed
        + 3 * c * moe.num_shared_experts * (moe.expert_ffn_hidden_size)
        + c
    )
    heads = cfg.engram.hash_heads
    rows = engram_rows(cfg) if cfg.engram.layers else 0
    memory_dim = heads * cfg.engram.embed_dim
    engram = rows * cfg.engram.embed_dim + memory_dim * (n + 1) * c + c + cfg.engram.conv_kernel * c
    moe_layers, engram_layers = moe_layer_count(cfg), len(cfg.engram.layers)
    layers = block_count(cfg)
    attention = sum(attention_size(cfg, layer) for layer in range(layers))
    blocks = attention + layers * 2 * residual + engram_layers * engram
    blocks += moe_layers * moe_ffn + (layers - moe_layers) * dense_ffn
    embeddings = cfg.vocab_size * c * (1 if cfg.tie_embeddings else 2)
    readout = n * c * n + 1 + n if hyper else 0
    mtp_inputs = 2 * c + 2 * c * c  # norms and projections of the hidden state and embedding
    mtp = cfg.mtp.depth * (mtp_inputs + readout + c)  # + its own readout and final norm
    total = embeddings + blocks + readout + c + mtp
    tables = engram_layers * rows * cfg.engram.embed_dim
    inactive = (
        moe_layers * (moe.num_experts - moe.top_k) * expert_size(cfg) if moe.num_experts else 0
    ) + engram_layers * (rows - heads) * cfg.engram.embed_dim
    return ParameterCount(total, total - inactive, tables, moe_layers * routed)


def apply_sparse_budget(cfg: ModelConfig, prefix: str = "model") -> ModelConfig:
    """`cfg` with expert count and table size set from the budget (unchanged without one)."""
    if cfg.sparse_budget is None:
        return cfg
    budget, fraction = cfg.sparse_budget, cfg.engram_fraction
    engram = cfg.engram if fraction > 0 else dataclasses.replace(cfg.engram, layers=[])
    require(
        fraction == 0 or bool(cfg.engram.layers),
        f"{prefix}.engram_fraction",
        fraction,
        f"must be 0 while {prefix}.engram.layers is empty",
    )
    if engram.layers:
        engram = _size_tables(cfg, engram, fraction * budget, prefix)
    sized = dataclasses.replace(cfg, engram=engram)
    engram_sparse = count_parameters(
        dataclasses.replace(sized, moe=dataclasses.replace(cfg.moe, num_experts=0))
    ).sparse
    return dataclasses.replace(sized, moe=_size_experts(sized, budget - engram_sparse, prefix))


def _size_tables(cfg: ModelConfig, engram, target: float, prefix: str):
    heads = engram.hash_heads
    per_head = target / (len(engram.layers) * engram.embed_dim * heads) + 1
    require(
        per_head >= 2,
        f"{prefix}.sparse_budget",
        cfg.sparse_budget,
        f"its Engram share ({target:.0f}) is too small for {heads} heads of 2 rows in "
        f"{len(engram.layers)} layer(s)",
    )
    return dataclasses.replace(engram, table_size=int(per_head))


def _size_experts(cfg: ModelConfig, target: float, prefix: str):
    moe_layers = moe_layer_count(
        dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=cfg.moe.top_k))
    )
    require(
        moe_layers > 0 or cfg.engram_fraction == 1,
        f"{prefix}.moe.first_k_dense",
        cfg.moe.first_k_dense,
        "leaves no MoE layer for the experts' share of the budget",
    )
    per_expert = expert_size(cfg) * max(1, moe_layers)
    extra = round(target / per_expert)
    if cfg.engram_fraction < 1 and extra < 1:
        raise RecipeError(
            f"{prefix}.sparse_budget",
            cfg.sparse_budget,
            f"leaves {target:.0f} parameters for routed experts, less than one "
            f"expert in every MoE layer ({per_expert}); raise it or the fraction",
        )
    return dataclasses.replace(cfg.moe, num_experts=cfg.moe.top_k + max(0, extra))
