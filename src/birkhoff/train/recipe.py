"""Everything a rank needs to train: the recipe sections below `launch`."""

from __future__ import annotations

from dataclasses import dataclass, field

from birkhoff.checkpoint.config import CheckpointConfig
from birkhoff.data.config import DataConfig
from birkhoff.errors import require
from birkhoff.model.budget import apply_sparse_budget
from birkhoff.model.config import ModelConfig
from birkhoff.parallel.config import ParallelConfig, require_engram_placement
from birkhoff.train.config import (
    BackendConfig,
    LoggingConfig,
    OptimConfig,
    TrainConfig,
)
from birkhoff.train.schedule import wsd_decay_steps
from birkhoff.train.weight_casts import resolve_weight_casts


@dataclass
class TrainRecipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self, world_size: int) -> None:
        """Every section's own checks, then the checks that span sections."""
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.parallel.validate(world_size)
        dp_size = self.parallel.resolved_dp(world_size)
        model = apply_sparse_budget(self.model)
        # What the layout cannot do with this model at all comes before the batch arithmetic,
        # whose fix (another batch size) would not help.
        self.parallel.validate_for_model(model, None)
        self.train.validate(dp_size, self.parallel.pp)
        resolve_weight_casts(self.train, self.parallel, world_size)
        self.parallel.validate_for_model(model, self.train.grad_accum_steps(dp_size))
        self.backend.validate()
        self.logging.validate()
        self.checkpoint.validate()
        require(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            self.data.seq_len,
            f"must be <= model.max_seq_len={self.model.max_seq_len}",
        )
        tp = self.parallel.tp
        require(
            not self.parallel.sequence_parallel or self.data.seq_len % tp == 0,
            "data.seq_len",
            self.data.seq_len,
            f"must be a multiple of parallel.tp={tp} with parallel.sequence_parallel=true "
            f"(each tp rank holds seq_len / tp positions); e.g. "
            f"{max(tp, self.data.seq_len // tp * tp)}",
        )
        if self.train.indexer_warmup_steps:
            warmup, attention = self.train.indexer_warmup_steps, self.model.attention
            require(
                warmup < self.train.steps,
                "train.indexer_warmup_steps",
                warmup,
                f"must be < train.steps={self.train.steps}",
            )
            require(
                attention.kind == "v4" and "csa" in attention.layer_types,
                "train.indexer_warmup_steps",
                warmup,
                "needs a CSA layer (model.attention.kind=v4 with csa in its layer_types)",
            )
        moe = self.model.moe
        learned = (self.model.num_layers - moe.first_k_dense - moe.hash_layers) * moe.num_experts
        mode = self.train.anticipatory.mode
        require(mode == "off" or learned > 0, "train.anticipatory.mode", mode,
                "needs MoE layers with learned routing (model.moe.first_k_dense and "
                "hash_layers leave none)")  # fmt: skip
        parallel = self.parallel
        require_engram_placement(
            parallel.engram_row_shard, parallel.engram_host, self.optim.engram_update
        )
        require(
            self.optim.warmup_steps < self.train.steps,
            "optim.warmup_steps",
            self.optim.warmup_steps,
            f"must be < train.steps={self.train.steps}",
        )
        if self.optim.schedule == "wsd":
            decay = wsd_decay_steps(self.optim, self.train.steps)
            require(
                self.optim.warmup_steps + decay <= self.train.steps,
                "optim.warmup_steps",
                self.optim.warmup_steps,
                f"warmup and the decay window ({decay} steps = optim.decay_fraction x "
                f"train.steps) must fit in train.steps={self.train.steps}",
            )
