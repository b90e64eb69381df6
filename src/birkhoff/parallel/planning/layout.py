"""A layout as the planner sees it, the workload of a step, and how a layout shares a model's
parameter groups out: which stage holds what, what tp and FSDP leave a rank, what FSDP gathers."""

from __future__ import annotations

from dataclasses import dataclass

from birkhoff.kernels.registry import BACKENDS
from birkhoff.parallel.config import ParallelConfig
from birkhoff.parallel.planning.inventory import FIRST, LAST
from birkhoff.parallel.planning.launches import LaunchCount

# What V4 attention keeps for backward (planning/activations.py): the reference kernels'
# float32 probabilities over every key; a fused kernel's log-sum-exp per head instead
# ("fused": FlashAttention-style); the npu backend's operator's blocks
# (kernels/npu_v4_attention.py; CSA's gathered picks run the reference there)
ATTENTION_ACTIVATIONS = ("reference", "fused", "npu")

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1
    micro_batch: int = 1
    activation_checkpoint: str = "none"
    sequence_parallel: bool = False
    engram_row_shard: bool = False
    # optim.engram_update=sparse: tables whole on every rank, outside FSDP, their row-sparse
    # gradients gathered over dp once a step
    engram_sparse: bool = False
    engram_host: bool = False  # those whole tables (and their AdamW state) in host memory
    muon: bool = False  # optim=muon_v4: weight matrices by Muon (one buffer), the rest AdamW
    # optim.embedding_update=sinkhorn: embedding, head and Engram tables by V4.1's update (one
    # buffer)
    balanced_tables: bool = False
    # train.spike with snapshot_every > 0: host snapshots of the rank's state kept
    host_snapshots: int = 0
    # train.anticipatory.mode=always: a look-ahead forward of every micro-batch each step
    anticipatory: bool = False
    fsdp_reduce_every_micro_batch: bool = False
    pp_schedule: str = "1f1b"
    pp_stages_per_rank: int = 1

    @property
    def num_stages(self) -> int:
        return self.pp * self.pp_stages_per_rank

    def rank_stages(self, pp_rank: int) -> list[int]:
        """The pipeline stages a rank of the pp dimension runs (the trainer's assignment)."""
        return [pp_rank + chunk * self.pp for chunk in range(self.pp_stages_per_rank)]

    @property
    def devices(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def overrides(self) -> list[str]:
        """The recipe overrides that run this layout."""
        values = {
            "parallel.pp": self.pp,
            "parallel.dp_replicate": self.dp_replicate,
            "parallel.dp_shard": self.dp_shard,
            "parallel.tp": self.tp,
            "parallel.ep": self.ep,
            "parallel.activation_checkpoint": self.activation_checkpoint,
            "parallel.sequence_parallel": str(self.sequence_parallel).lower(),
            "parallel.engram_row_shard": str(self.engram_row_shard).lower(),
            "parallel.engram_host": str(self.engram_host).lower(),
            "parallel.fsdp_reduce_every_micro_batch": str(
                self.fsdp_reduce_every_micro_batch
            ).lower(),
            "parallel.pp_schedule": self.pp_schedule,
            "parallel.pp_stages_per_rank": self.pp_stages_per_rank,
            "train.micro_batch_size": self.micro_batch,
            "optim.engram_update": "sparse" if self.engram_sparse else "dense",
        }
        if self.muon:
            values["optim.name"] = "muon_v4"
        if self.balanced_tables:
            values["optim.embedding_update"] = "sinkhorn"
        if self.host_snapshots:
            values["train.spike.enabled"] = "true"
            values["train.spike.snapshots_kept"] = self.host_snapshots
        if self.anticipatory:
            values["train.anticipatory.mode"] = "always"
        return [f"{key}={value}" for key, value in values.items()]


def layout_of(
    parallel: ParallelConfig,
    micro_batch: int,
    devices: int,
    engram_update: str = "dense",
    optimizer: str = "adamw",
    embedding_update: str = "adamw",
    host_snapshots: int = 0,
    anticipatory: bool = False,
) -> Layout:
    """The Layout a recipe's `parallel` section (and `optim.engram_update`, `optim.name`,
    `optim.embedding_update`, the host snapshots its spike guard keeps, Anticipatory Routing
    at every step) give on `devices` (validated)."""
    parallel.validate(devices)
    degrees = parallel.degrees(devices)
    return Layout(
        pp=degrees["pp"],
        dp_replicate=degrees["dp_replicate"],
        dp_shard=degrees["dp_shard"],
        tp=degrees["tp"],
        ep=degrees["ep"],
        micro_batch=micro_batch,
        activation_checkpoint=parallel.activation_checkpoint,
        sequence_parallel=parallel.sequence_parallel,
        engram_row_shard=parallel.engram_row_shard,
        engram_sparse=engram_update == "sparse",
        engram_host=parallel.engram_host,
        muon=optimizer == "muon_v4",
        balanced_tables=embedding_update == "sinkhorn",
        host_snapshots=host_snapshots,
        anticipatory=anticipatory,
        fsdp_reduce_every_micro_batch=parallel.fsdp_reduce_every_micro_batch,
        pp_schedule=parallel.pp_schedule,
        pp_stages_per_rank=parallel.pp_stages_per_rank,
    )


@dataclass(frozen=True)
class Workload:
    global_batch: int  # sequences per step
    seq_len: int
    mixed_precision: bool = True  # bf16 autocast (activations in bf16)
    attention: str = "reference"  # one of ATTENTION_ACTIVATIONS
    # the kernel backend the devices run: its elementwise traffic per saved byte (traffic.py)
    kernels: str = "reference"
    # train.weight_casts: bf16 weight copies made once a step (auto, per_step: where FSDP does
    # not gather the weights) or by every micro-batch (keeps_weight_casts)
    weight_casts: str = "auto"
    positions: bool = True  # document positions travel between pipeline stages
    loader_rows: bool = True  # Engram rows computed by the loader travel with them
    param_dtype: str = "bfloat16"  # FSDP's gathered parameters
    reduce_dtype: str = "float32"
    # eager kernel launches of a micro-batch's forward and backward and of an optimizer
    # step (launches.py); None: the host's time is not modelled
    launches: LaunchCount | None = None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_ACTIVATIONS:
            kinds = ", ".join(ATTENTION_ACTIVATIONS)
            raise ValueError(f"Workload.attention {self.attention!r}: not one of {kinds}")
        if self.kernels not in BACKENDS:
            raise ValueError(f"Workload.kernels {self.kernels!r}: not one of {', '.join(BACKENDS)}")


def keeps_weight_casts(layout: Layout, work: Workload) -> bool:
    """Whether a step's bf16 weight casts serve all its micro-batches, as the trainer
    resolves train.weight_casts (train/weight_casts.py): not where FSDP wraps the model
    (every data-parallel layout but pure replication, parallel.config's uses_ddp)."""
    replicas_only = (layout.dp_shard, layout.tp, layout.pp, layout.ep) == (1, 1, 1, 1)
    ddp = layout.dp_replicate > 1 and replicas_only and not layout.engram_row_shard
    fsdp = layout.dp > 1 and not ddp
    return work.mixed_precision and work.weight_casts != "per_micro_batch" and not fsdp


def stage_layers(num_layers: int, num_stages: int) -> list[list[int]]:
    """The trainer's even split; layers that do not divide go one each to the first stages
    (a published run with an uneven split)."""
    per, extra = divmod(num_layers, num_stages)
    sizes = [per + (s < extra) for s in range(num_stages)]
    starts = [sum(sizes[:s]) for s in range(num_stages)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes, strict=True)]


def stage_keys(stage: int, layers: list[int], num_stages: int) -> set[int]:
    first = {FIRST} if stage == 0 else set()
    return set(layers) | first | ({LAST} if stage == num_stages - 1 else set())


def tp_local(g, layout: Layout) -> float:
    return g.numel / (layout.tp if g.tp_split else 1)


def unit(g, layout: Layout) -> float:
    """Elements of a group in its FSDP unit before sharding: its tp shard (experts: their ep
    shard)."""
    return tp_local(g, layout) / (layout.ep if g.expert else 1)


def row_sharded(g, layout: Layout) -> bool:
    return g.engram_table and layout.engram_row_shard


def whole_table(g, layout: Layout) -> bool:
    """An Engram table kept whole on every rank, its gradients row-sparse."""
    return g.engram_table and layout.engram_sparse


def sparse_rows(g, cfg, lookups: float) -> float:
    """At most how many rows of the whole table `g` a sparse gradient over `lookups` token
    positions holds: every head's lookup a distinct row (an upper bound: repeated n-grams
    share rows)."""
    e = cfg.engram
    return min(g.numel / e.embed_dim, lookups * e.hash_heads)


def gathered(g, layout: Layout) -> float:
    """Elements FSDP gathers of a group on a rank: none of an Engram table it does not manage
    (row-sharded or whole), none of the experts when ep takes all of dp_shard (their unit's
    shard group is one rank)."""
    if row_sharded(g, layout) or whole_table(g, layout):
        return 0.0
    if g.expert and layout.dp_shard == layout.ep:
        return 0.0
    return unit(g, layout)
