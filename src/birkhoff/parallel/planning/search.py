"""The layouts of a cluster the trainer can run for a model, estimated and sorted: tp inside a
node, pp over whole layer splits (1F1B, or interleaved 1F1B and zero bubble with 2 chunks per
rank), ep inside dp_shard, HSDP replicas, micro-batches that feed the pipeline, each
activation-checkpointing mode; sequence parallelism with every tp > 1 and Engram tables
row-sharded under FSDP (both only save memory and traffic). Where the recipe updates Engram
tables sparsely (optim.engram_update=sparse), each table is whole on every rank, in device
memory or in host memory (parallel.engram_host): both are searched, the host saving the
device the table and its AdamW state for a copy of the rows looked up each micro-batch."""

from __future__ import annotations

from itertools import product

from birkhoff.errors import RecipeError, require
from birkhoff.parallel.config import ParallelConfig, require_engram_placement
from birkhoff.parallel.planning.cluster import Cluster
from birkhoff.parallel.planning.estimate import Estimate, estimate
from birkhoff.parallel.planning.inventory import Inventory
from birkhoff.parallel.planning.layout import Layout, Workload

# with pp > 1: 1F1B, and the two schedules that run 2 chunks per rank
PIPELINE_SCHEDULES = (("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_runnable(inv: Inventory, layout: Layout, work: Workload) -> None:
    """Raise the trainer's own RecipeError if it would refuse `layout` for this model and
    batch."""
    micro_batches, left = divmod(work.global_batch, layout.micro_batch * layout.dp)
    require(
        left == 0,
        "train.global_batch_size",
        work.global_batch,
        f"must be divisible by train.micro_batch_size ({layout.micro_batch}) x "
        f"data-parallel ranks ({layout.dp})",
    )
    parallel = ParallelConfig(
        dp_replicate=layout.dp_replicate,
        dp_shard=layout.dp_shard,
        tp=layout.tp,
        pp=layout.pp,
        ep=layout.ep,
        activation_checkpoint=layout.activation_checkpoint,
        sequence_parallel=layout.sequence_parallel,
        engram_row_shard=layout.engram_row_shard,
        pp_schedule=layout.pp_schedule,
        pp_stages_per_rank=layout.pp_stages_per_rank,
    )
    parallel.validate(layout.devices)
    parallel.validate_for_model(inv.cfg, micro_batches)
    update = "sparse" if layout.engram_sparse else "dense"
    require_engram_placement(layout.engram_row_shard, layout.engram_host, update)
    balanced = "sinkhorn" if layout.balanced_tables else "adamw"
    require(not (layout.balanced_tables and layout.engram_sparse), "optim.embedding_update",
            balanced, "needs optim.engram_update=dense (train/config.py)")  # fmt: skip


def runnable(inv: Inventory, layout: Layout, work: Workload) -> bool:
    """Whether the trainer accepts `layout` for this model and batch (its own validation)."""
    try:
        check_runnable(inv, layout, work)
    except RecipeError:
        return False
    return True


def candidate_layouts(
    inv: Inventory,
    work: Workload,
    cluster: Cluster,
    engram_sparse: bool = False,
    muon: bool = False,
    balanced_tables: bool = False,
    host_snapshots: int = 0,
    anticipatory: bool = False,
) -> list[Layout]:
    cfg = inv.cfg
    engram = bool(cfg.engram.layers)
    placements = (False, True) if engram and engram_sparse else (False,)  # host-resident?
    layouts = []
    for tp in [d for d in _divisors(cluster.node_size) if d <= cluster.devices]:
        for pp in [p for p in _divisors(cfg.num_layers) if p <= 64]:
            if cluster.devices % (tp * pp):
                continue
            dp = cluster.devices // (tp * pp)
            for replicate in [r for r in _divisors(dp) if r <= 8]:
                shard = dp // replicate
                experts = cfg.moe.num_experts or 1
                for ep in [e for e in _divisors(shard) if experts % e == 0]:
                    per_rank = work.global_batch // dp if work.global_batch % dp == 0 else 0
                    for micro in [m for m in _divisors(per_rank) if m <= 16]:
                        reduce_modes = (False, True) if shard > 1 and per_rank > micro else (False,)
                        schedules = PIPELINE_SCHEDULES if pp > 1 else (("1f1b", 1),)
                        for checkpoint, every, (schedule, chunks), host in product(
                            ("none", "selective", "full"), reduce_modes, schedules, placements
                        ):
                            layout = Layout(
                                pp=pp,
                                dp_replicate=replicate,
                                dp_shard=shard,
                                tp=tp,
                                ep=ep,
                                micro_batch=micro,
                                activation_checkpoint=checkpoint,
                                sequence_parallel=tp > 1,
                                engram_row_shard=engram and shard > 1 and not engram_sparse,
                                engram_sparse=engram and engram_sparse,
                                engram_host=host,
                                muon=muon,
                                balanced_tables=balanced_tables,
                                host_snapshots=host_snapshots,
                                anticipatory=anticipatory,
                                fsdp_reduce_every_micro_batch=every,
                                pp_schedule=schedule,
                                pp_stages_per_rank=chunks,
                            )
                            if runnable(inv, layout, work):
                                layouts.append(layout)
    return layouts


def plan(
    inv: Inventory,
    work: Workload,
    cluster: Cluster,
    engram_sparse: bool = False,
    muon: bool = False,
    balanced_tables: bool = False,
    host_snapshots: int = 0,
    anticipatory: bool = False,
) -> list[Estimate]:
    """Every runnable layout, estimated; those that fit first, fastest first.
    `engram_sparse`: the recipe's optim.engram_update is sparse; `muon`: optim.name is
    muon_v4; `balanced_tables`: optim.embedding_update is sinkhorn; `host_snapshots`: the
    spike guard's snapshots kept on the host; `anticipatory`: Anticipatory Routing at every
    step."""
    candidates = candidate_layouts(
        inv, work, cluster, engram_sparse, muon, balanced_tables, host_snapshots, anticipatory
    )
    estimates = [estimate(inv, layout, work, cluster) for layout in candidates]
    return sorted(estimates, key=lambda e: (not e.fits, e.step_s))
