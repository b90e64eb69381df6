"""The `parallel` recipe section: degrees of the one DeviceMesh and how each dimension behaves."""

from __future__ import annotations

from dataclasses import dataclass

from birkhoff.errors import require, require_choice
from birkhoff.model.config import ModelConfig

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "zero_bubble")
CHECKPOINT_MODES = ("none", "full", "selective")
DTYPES = ("float32", "bfloat16")


@dataclass
class ParallelConfig:
    """Degrees: the product dp_replicate x dp_shard x tp x pp equals the world size; -1 in
    dp_shard (or dp_replicate) takes what the others leave. `ep` is folded inside dp_shard:
    experts are split over ep ranks and data-parallel over the remaining dp_shard / ep."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    # Pipeline: schedule, model chunks per rank (2 for interleaved and zero bubble), and an
    # optional explicit number of layers per stage (default: as even as possible).
    pp_schedule: str = "1f1b"
    pp_stages_per_rank: int = 1
    pp_split: list[int] | None = None
    # FSDP2: free the gathered parameters after forward (ZeRO-3) or keep them for backward.
    reshard_after_forward: bool = True
    # With gradient accumulation: reduce-scatter after every micro-batch (gradients stay
    # sharded) rather than only after the last (fewer collectives, but every rank holds its
    # unsharded gradients through the step: the whole model's for a large one).
    fsdp_reduce_every_micro_batch: bool = False
    param_dtype: str = "float32"
    reduce_dtype: str = "float32"
    activation_checkpoint: str = "none"
    # Shard every Engram table by rows over the dp_shard group (index all-to-all, row gather).
    engram_row_shard: bool = False
    # Keep every Engram table (and its AdamW state) in host memory: lookups gather rows on
    # the host and copy them to the device, gradients come back as rows (needs
    # optim.engram_update=sparse).
    engram_host: bool = False
    # With tp > 1: split the residual along the sequence over the tp ranks between the
    # tensor-parallel sublayers (norms, mHC, router and routed experts run on T / tp tokens).
    sequence_parallel: bool = False

    def degrees(self, world_size: int) -> dict[str, int]:
        """The resolved degrees (the -1 filled in); call after validate()."""
        fixed = {"tp": self.tp, "pp": self.pp}
        replicate, shard = self.dp_replicate, self.dp_shard
        rest = world_size // max(1, self.tp * self.pp)
        if shard == -1:
            shard = rest // replicate if replicate > 0 else 1
        if replicate == -1:
            replicate = rest // shard if shard > 0 else 1
        return {"dp_replicate": replicate, "dp_shard": shard, **fixed, "ep": self.ep}

    def uses_ddp(self, world_size: int) -> bool:
        """Pure replication (only dp_replicate > 1): DDP's bucketed all-reduce fits best."""
        degrees = self.degrees(world_size)
        others = (degrees["dp_shard"], self.tp, self.pp, self.ep)
        return degrees["dp_replicate"] > 1 and others == (1, 1, 1, 1) and not self.engram_row_shard

    def uses_fsdp(self, world_size: int) -> bool:
        return self.resolved_dp(world_size) > 1 and not self.uses_ddp(world_size)

    def resolved_dp(self, world_size: int) -> int:
        """Data-parallel ranks: replicas x shards."""
        degrees = self.degrees(world_size)
        return degrees["dp_replicate"] * degrees["dp_shard"]

    def validate(self, world_size: int, prefix: str = "parallel") -> None:
        """The recipe's own consistency; the model-dependent checks are `validate_for_model`."""
        for name in ("tp", "pp", "ep", "pp_stages_per_rank"):
            value = getattr(self, name)
            require(value >= 1, f"{prefix}.{name}", value, "must be a positive integer")
        for name in ("dp_replicate", "dp_shard"):
            value = getattr(self, name)
            require(value == -1 or value >= 1, f"{prefix}.{name}", value, "must be -1 or >= 1")
        require(
            not (self.dp_replicate == -1 and self.dp_shard == -1),
            f"{prefix}.dp_replicate",
            self.dp_replicate,
            "and dp_shard cannot both be -1; fix one of them",
        )
        require_choice(f"{prefix}.pp_schedule", self.pp_schedule, PP_SCHEDULES)
        require_choice(
            f"{prefix}.activation_checkpoint", self.activation_checkpoint, CHECKPOINT_MODES
        )
        require(
            self.tp > 1 or not self.sequence_parallel,
            f"{prefix}.sequence_parallel",
            self.sequence_parallel,
            "needs tp > 1 (it splits the sequence over the tensor-parallel ranks); set "
            f"{prefix}.tp or turn it off",
        )
        require_choice(f"{prefix}.param_dtype", self.param_dtype, DTYPES)
        require_choice(f"{prefix}.reduce_dtype", self.reduce_dtype, DTYPES)
        self._validate_world(world_size, prefix)
        self._validate_pipeline_schedule(prefix)
        degrees = self.degrees(world_size)
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            require(
                value == "float32" or self.uses_fsdp(world_size),
                f"{prefix}.{name}",
                value,
                "applies to FSDP2 only (dp_shard x dp_replicate > 1, not pure replication); "
                "use train.mixed_precision=bf16 for autocast instead",
            )
        require(
            degrees["dp_shard"] % self.ep == 0,
            f"{prefix}.ep",
            self.ep,
            f"must divide dp_shard={degrees['dp_shard']} (experts are split inside the "
            f"sharded data-parallel ranks); use one of {_divisors(degrees['dp_shard'])}, or raise "
            "dp_shard (lowering dp_replicate)",
        )

    def _validate_world(self, world_size: int, prefix: str) -> None:
        replicate, shard = max(1, self.dp_replicate), max(1, self.dp_shard)
        fixed = self.tp * self.pp * replicate * shard
        product = (
            f"dp_replicate x dp_shard x tp x pp = {self.dp_replicate} x {self.dp_shard} x "
            f"{self.tp} x {self.pp}"
        )
        if -1 in (self.dp_replicate, self.dp_shard):
            key = "dp_replicate" if self.dp_replicate > 1 else "tp" if self.tp > 1 else "pp"
            require(
                world_size % fixed == 0,
                f"{prefix}.{key}",
                getattr(self, key),
                f"the fixed degrees of {product} multiply to {fixed}, which does not divide "
                f"the world size {world_size}; {_suggestion(world_size)}",
            )
            return
        require(
            fixed == world_size,
            f"{prefix}.dp_shard",
            self.dp_shard,
            f"{product} = {fixed} must equal the world size {world_size} (nnodes x "
            f"nproc_per_node); {_suggestion(world_size)}",
        )

    def _validate_pipeline_schedule(self, prefix: str) -> None:
        multi = self.pp_schedule in MULTI_STAGE_SCHEDULES
        require(
            not multi or self.pp_stages_per_rank >= 2,
            f"{prefix}.pp_stages_per_rank",
            self.pp_stages_per_rank,
            f"must be >= 2 for pp_schedule={self.pp_schedule} (it interleaves model chunks)",
        )
        require(
            not multi or self.pp > 1,
            f"{prefix}.pp_schedule",
            self.pp_schedule,
            "needs pp > 1; with pp=1 keep the default (no pipeline is built)",
        )
        require(
            multi or self.pp_stages_per_rank == 1,
            f"{prefix}.pp_stages_per_rank",
            self.pp_stages_per_rank,
            f"must be 1 for pp_schedule={self.pp_schedule}; use interleaved_1f1b or "
            "zero_bubble for several chunks per rank",
        )

    @property
    def num_stages(self) -> int:
        return self.pp * self.pp_stages_per_rank

    def stage_layers(self, num_layers: int) -> list[int]:
        """Layers per pipeline stage: `pp_split`, else an even split."""
        if self.pp_split is not None:
            return list(self.pp_split)
        return [num_layers // self.num_stages] * self.num_stages

    def validate_for_model(
        self, model: ModelConfig, micro_batches: int | None, prefix: str = "parallel"
    ) -> None:
        """What the model's shapes allow: tp divides heads and hidden sizes, ep the routed
        experts, pp the layers; `micro_batches` per step feed the pipeline (None: checked
        later, once the batch sizes are known)."""
        self._validate_tensor_parallel(model, prefix)
        if self.ep > 1:
            experts = model.moe.num_experts
            require(
                experts > 0 and experts % self.ep == 0,
                f"{prefix}.ep",
                self.ep,
                f"must divide model.moe.num_experts={experts}; use one of "
                f"{_divisors(experts) if experts else [1]}",
            )
        if self.pp > 1 or self.pp_stages_per_rank > 1:
            self._validate_pipeline(model, micro_batches, prefix)

    def _validate_tensor_parallel(self, model: ModelConfig, prefix: str) -> None:
        sizes = {"model.num_heads": model.num_heads, "model.ffn_hidden_size": model.ffn_hidden_size}
        attention = model.attention
        if attention.kind == "v4":  # heads, output groups and indexer heads split; KV whole
            sizes["model.attention.o_groups"] = attention.o_groups
            sizes["model.attention.index_heads"] = attention.index_heads
        else:
            sizes["model.num_kv_heads"] = model.num_kv_heads
            sizes["model.hidden_size"] = model.hidden_size
        if model.moe.num_experts and model.moe.num_shared_experts:
            shared = model.moe.num_shared_experts * model.moe.expert_ffn_hidden_size
            sizes["shared-expert hidden size"] = shared
        valid = [
            d for d in _divisors(min(sizes.values())) if all(s % d == 0 for s in sizes.values())
        ]
        for name, size in sizes.items():
            require(
                size % self.tp == 0,
                f"{prefix}.tp",
                self.tp,
                f"must divide {name}={size}; use one of {valid}",
            )

    def _validate_pipeline(
        self, model: ModelConfig, micro_batches: int | None, prefix: str
    ) -> None:
        stages, layers = self.num_stages, model.num_layers
        if self.pp_split is None:
            require(
                layers % stages == 0,
                f"{prefix}.pp",
                self.pp,
                f"pp x pp_stages_per_rank = {stages} stages must divide model.num_layers="
                f"{layers}, or set parallel.pp_split to layers per stage (e.g. "
                f"{_uneven_split(layers, stages)})",
            )
        else:
            split = list(self.pp_split)
            require(
                len(split) == stages and sum(split) == layers and min(split) >= 1,
                f"{prefix}.pp_split",
                split,
                f"needs {stages} entries (pp x pp_stages_per_rank), each >= 1, summing to "
                f"model.num_layers={layers}; e.g. {_uneven_split(layers, stages)}",
            )
        require(
            micro_batches is None or micro_batches >= self.pp,
            "train.micro_batch_size",
            micro_batches,
            f"gives {micro_batches} micro-batches per step, fewer than pp={self.pp} pipeline "
            "ranks; lower train.micro_batch_size so each rank's batch splits into >= pp",
        )
        # torch's multi-chunk schedules run the micro-batches in rounds of about pp each
        rounds = max(1, (micro_batches or 0) // self.pp)
        require(
            self.pp_schedule not in MULTI_STAGE_SCHEDULES
            or micro_batches is None
            or micro_batches % rounds == 0,
            "train.micro_batch_size",
            micro_batches,
            f"gives {micro_batches} micro-batches per step; pp_schedule={self.pp_schedule} runs "
            f"them in {rounds} rounds and needs a multiple of {rounds}; choose "
            f"train.micro_batch_size so the micro-batches per step are a multiple of pp={self.pp}",
        )
        require(
            not model.tie_embeddings,
            "model.tie_embeddings",
            model.tie_embeddings,
            "must be false with pp > 1 (the embedding and the head live on different stages)",
        )


def require_engram_placement(row_shard: bool, host: bool, engram_update: str) -> None:
    """Sparse Engram updates keep each table whole (on the device or the host); row sharding
    splits it: one or the other. A host table is updated sparsely: a dense update would copy
    the whole table's gradient over PCIe and run AdamW over every row on the host."""
    require(
        engram_update == "sparse" or not host,
        "parallel.engram_host",
        host,
        "needs optim.engram_update=sparse (only the looked-up rows cross to the host)",
    )
    require(
        engram_update == "dense" or not row_shard,
        "optim.engram_update",
        engram_update,
        "keeps every Engram table whole on each data-parallel rank: it cannot combine "
        "with parallel.engram_row_shard=true; set one of them off",
    )


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def _uneven_split(layers: int, stages: int) -> list[int] | str:
    if layers < stages:
        return f"at most {layers} stages"
    base, extra = divmod(layers, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def _suggestion(world_size: int) -> str:
    return (
        f"e.g. dp_shard={world_size} (FSDP on every rank), or dp_shard=-1 with tp and pp "
        f"dividing {world_size}"
    )
