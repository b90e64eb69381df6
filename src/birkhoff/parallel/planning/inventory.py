"""What a model holds, tensor by tensor, read off the model itself built on the meta device:
where each parameter lives (first stage, a layer, last stage), whether tensor parallelism
splits it (the blocks' own tensor-parallel plan), whether it is a routed expert or an Engram
table, and the matmul FLOPs a token spends on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import torch

from birkhoff.model.budget import apply_sparse_budget
from birkhoff.model.config import ModelConfig
from birkhoff.model.matrices import balanced_tables, weight_matrices
from birkhoff.model.transformer import Block, Transformer
from birkhoff.model.v4_attention import V4Attention
from birkhoff.parallel.sequence_parallel import sequence_local_slots

T = TypeVar("T")

FIRST, LAST = -1, 1 << 30  # the stage keys of the embedding and of the head, norm and MTP


@dataclass(frozen=True)
class TensorInfo:
    name: str
    numel: int
    layer: int  # FIRST, a main layer index, or LAST
    tp_split: bool
    expert: bool
    engram_table: bool
    # held whole over tp by a main block and run on its slice of the sequence under sequence
    # parallelism (mHC, norms, router, routed experts): gradients summed over tp after backward
    sequence_local: bool
    active_fraction: float  # of its elements a token multiplies by (routed: top_k / E)
    matmul: bool  # a weight a token multiplies by (not an embedding row, a bias or a gain)
    # what optim=muon_v4 orthogonalises (model/matrices.py): (matrices, rows, columns), the
    # routed experts' stack one matrix per expert; None for what AdamW trains
    matrices: tuple[int, int, int] | None = None
    # a table V4.1's Sinkhorn-balanced update trains (embedding, head, Engram tables)
    balanced: bool = False
    # tp splits its rows (a colwise layer's weight): FSDP then shards the same dim, strided
    tp_rows: bool = False


@dataclass(frozen=True)
class Group:
    """Parameters that shard alike, summed: one layer's (or MTP depth's) block, or the root."""

    layer: int
    block: bool  # in an FSDP block unit (main or MTP block); else the root unit
    tp_split: bool
    expert: bool
    engram_table: bool
    sequence_local: bool
    muon: bool  # weight matrices (Muon trains them under optim=muon_v4)
    balanced: bool  # tables (the Sinkhorn-balanced update trains them under embedding_update)
    numel: int


@dataclass(frozen=True)
class Inventory:
    cfg: ModelConfig
    params: tuple[TensorInfo, ...]
    buffer_bytes: dict[int, int]  # by layer key

    @cached_property
    def groups(self) -> tuple[Group, ...]:
        sums: dict[tuple, int] = {}
        for t in self.params:
            block = t.layer not in (FIRST, LAST) or ".block." in t.name
            key = (t.layer, block, t.tp_split, t.expert, t.engram_table, t.sequence_local)
            key += (t.matrices is not None, t.balanced)
            sums[key] = sums.get(key, 0) + t.numel
        return tuple(Group(*key, numel) for key, numel in sums.items())

    @cached_property
    def _derived(self) -> dict[tuple, Any]:
        return {}

    def remembered(self, key: tuple, compute: Callable[[], T]) -> T:
        """`compute()`, once per `key` for this inventory: a plan estimates every layout of
        this model, and layouts share what depends on a few of their degrees (a block's saved
        bytes, Muon's matrices per rank); the key names those degrees."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.params)

    @property
    def active(self) -> float:
        """Parameters a token uses (routed experts: its top_k of them)."""
        return sum(t.numel * t.active_fraction for t in self.params)

    def matmul_flops_per_token(self) -> float:
        """Forward FLOPs per token in weight matmuls (2 per multiply-add)."""
        return 2 * sum(t.numel * t.active_fraction for t in self.params if t.matmul)


def build_inventory(cfg: ModelConfig) -> Inventory:
    """The inventory of `cfg` (sized by its sparse budget), read from a meta-device model."""
    cfg.validate()
    sized = apply_sparse_budget(cfg)
    with torch.device("meta"):
        model = Transformer(sized)
    roles = _tp_roles(model)
    split = set(roles)
    local = _sequence_local_names(model, split)
    matrices = {id(p) for p in weight_matrices(model)}
    tables = {id(p) for p in balanced_tables(model)}
    params = []
    for name, param in model.named_parameters():
        expert = ".experts.w_" in name
        engram_table = name.endswith("engram.table.weight")
        matmul = param.dim() >= 2 and not (name.startswith("embedding") or engram_table)
        matmul = matmul and "bias_res" not in name and "position_bias" not in name
        matmul = matmul or name == head_weight_name(sized)  # tied: the head multiplies by it
        params.append(
            TensorInfo(
                name=name,
                numel=param.numel(),
                layer=_layer_of(name),
                tp_split=name in split,
                expert=expert,
                engram_table=engram_table,
                sequence_local=name in local,
                active_fraction=_active_fraction(param, sized, expert, engram_table),
                matmul=matmul,
                matrices=(param.numel() // param.shape[-1] // param.shape[-2], *param.shape[-2:])
                if id(param) in matrices
                else None,
                balanced=id(param) in tables,
                tp_rows=roles.get(name) == "colwise",
            )
        )
    buffers: dict[int, int] = {}
    # every module's own (a materialised model does not share them: to_empty gives each its own)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        layer = _layer_of(name)
        buffers[layer] = buffers.get(layer, 0) + buffer.numel() * buffer.element_size()
    return Inventory(sized, tuple(params), buffers)


def _active_fraction(
    param: torch.Tensor, cfg: ModelConfig, expert: bool, engram_table: bool
) -> float:
    """The share of a tensor's elements one token uses: top_k / E of the routed experts, of
    an Engram table the row each hash head reads (as model/budget.py counts them)."""
    if expert:
        return cfg.moe.top_k / cfg.moe.num_experts
    if engram_table:
        return cfg.engram.hash_heads / param.shape[0]
    return 1.0


def head_weight_name(cfg: ModelConfig) -> str:
    """The parameter the output head multiplies by: the embedding's when tied (the model then
    holds it once, under that name)."""
    return "embedding.weight" if cfg.tie_embeddings else "head.weight"


def _layer_of(name: str) -> int:
    if name.startswith("blocks."):
        return int(name.split(".")[1])
    return FIRST if name.startswith("embedding") else LAST


def _tp_roles(model: Transformer) -> dict[str, str]:
    """Parameters tensor parallelism splits, by role: those of the colwise / rowwise layers of
    every block's plan, and V4 attention's per-head sinks (split along their only dim)."""
    split = {}
    for prefix, block in model.named_modules():
        if not isinstance(block, Block):
            continue
        roles = block.tensor_parallel_plan(sequence_parallel=False)
        for name, _ in block.named_parameters():
            role = roles.get(name.rsplit(".", 1)[0])
            if role in ("colwise", "rowwise"):
                split[f"{prefix}.{name}"] = role
        if isinstance(block.attention, V4Attention):
            split[f"{prefix}.attention.sinks"] = "colwise"
    return split


def _sequence_local_names(model: Transformer, split: set[str]) -> set[str]:
    """The main blocks' parameters whose gradients sequence parallelism sums over tp after
    backward: the trainer's own selection (sequence_local_slots), less what tp splits (on
    the meta model no parameter is a DTensor yet)."""
    names = set()
    for index, block in (model.blocks or {}).items():
        prefix = {id(module): name for name, module in block.named_modules()}
        for module, name in sequence_local_slots(block):
            full = ".".join(p for p in ("blocks", str(index), prefix[id(module)], name) if p)
            if full not in split:
                names.add(full)
    return names
