"""Memory, communication and step time of one layout, from a model's inventory.

Memory per device (the pipeline rank that needs most): parameters, gradients and AdamW state
in float32 at the share FSDP, tp and pp leave a rank (routed experts: split over ep and the
remaining dp_shard / ep, so over dp_shard in all; with gradient accumulation under FSDP the
gradients stay unsharded until the step's last micro-batch, as the trainer runs it), buffers
(the model's own, and FSDP's gathered units: two blocks in flight plus the root, and one
block's unsharded gradients), and activations (activations.py) at their peak over the rank's
pipeline schedule (pipeline_schedule.py: its stages' micro-batches in flight, as the
schedule's own order keeps them), plus the larger of one block's recomputation and, on the
last stage, the loss's chunk of logits (kernels/linear_cross_entropy.py: it computes the
head's gradients in its forward and keeps them, never the whole logits). The
total is the peak: during backward (with the gradients only once a step accumulates them
over micro-batches) or in the optimizer step, whichever is larger; the parts are the most
each kind takes. Measured on CPU against the allocator's peak: tests/test_parallel.py.

Communication, bytes per step per device, by collective, with the payload as the trainer's
calls pass it: FSDP all-gather (the unsharded unit, in param_dtype, per micro-batch: blocks
in forward and again in backward, the root once) and reduce-scatter (the unsharded unit's
float32 gradients, once per step); HSDP all-reduce of the shards over dp_replicate; DDP's
all-reduce of every gradient; expert all-to-all (each routed token's hidden state, out and
back, forward and backward); tensor parallelism's all-reduces, all-gathers and
reduce-scatters as the blocks' plans run them (communication.py); pipeline send/recv of the
residual (and its gradient) per micro-batch.

Step time: matmul and attention FLOPs at `cluster.matmul_efficiency` of the peak, then the
elementwise kernels' device-memory traffic (traffic.py) at `cluster.memory_efficiency` of
`cluster.memory_gbps`; tp and ep collectives on the critical path (no overlap:
DualPipe-style overlap is not modelled); FSDP and HSDP collectives overlapped with both, only
their excess exposed; the pipeline bubble of the schedule's order on top
(pipeline_schedule.py). With the eager kernel launches counted (`birkhoff plan --launches`,
launches.py; Muon's Newton-Schulz runs charged to the ranks that make them), the host's
time at `cluster.launch_us` each, when longer, sets the step instead (the host runs ahead of
the device). MFU: model FLOPs (no recomputation) over step
time x devices x peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from birkhoff.parallel.planning.activations import (
    block_bytes,
    bytes_per_token,
    head_terms,
    head_weight_gradient_bytes,
    loss_transient_bytes,
    stage_blocks,
    window_keys,
)
from birkhoff.parallel.planning.cluster import Cluster
from birkhoff.parallel.planning.communication import (
    TP_COLLECTIVES,
    comm_seconds,
    communication,
)
from birkhoff.parallel.planning.inventory import Inventory, head_weight_name
from birkhoff.parallel.planning.launches import launches_per_micro_batch
from birkhoff.parallel.planning.layout import (
    DTYPE_BYTES,
    Layout,
    Workload,
    gathered,
    keeps_weight_casts,
    row_sharded,
    sparse_rows,
    stage_keys,
    stage_layers,
    tp_local,
    unit,
    whole_table,
)
from birkhoff.parallel.planning.muon import (
    muon_matrices,
    muon_step_bytes,
    newton_schulz_flops,
    optimizer_launches,
)
from birkhoff.parallel.planning.pipeline_schedule import (
    Action,
    activation_peak,
    bubble,
    rank_orders,
)
from birkhoff.parallel.planning.traffic import cast_weights, rank_traffic

GIB = 2**30


@dataclass
class Estimate:
    layout: Layout
    memory_gib: dict[str, float]  # per device, the fullest stage
    comm_gib: dict[str, float]  # bytes per step per device, by collective
    traffic_gib: dict[str, float]  # device-memory bytes of elementwise kernels, by kind
    compute_s: float  # matmuls at cluster.matmul_efficiency
    memory_bound_s: float  # traffic_gib at cluster.memory_efficiency of memory_gbps
    launches: int  # eager kernel launches per step on the busiest rank (0: not counted)
    host_s: float  # those at cluster.launch_us
    exposed_comm_s: float
    bubble: float
    step_s: float
    mfu: float
    fits: bool
    dominant: str  # what takes most of the step: compute, a collective, or the bubble

    def as_dict(self) -> dict:
        return {**asdict(self), "layout": asdict(self.layout)}


def estimate(inv: Inventory, layout: Layout, work: Workload, cluster: Cluster) -> Estimate:
    cfg = inv.cfg
    micro_batches = work.global_batch // (layout.micro_batch * layout.dp)
    stages = stage_layers(cfg.num_layers, layout.num_stages)
    orders = (
        rank_orders(layout.pp_schedule, layout.pp, layout.pp_stages_per_rank, micro_batches)
        if layout.pp > 1
        else ((Action("F", 0, 0), Action("B", 0, 0)),)  # micro-batches one after another
    )
    memory = max(
        (
            _rank_memory(inv, layout, work, rank, stages, orders[rank], micro_batches, cluster)
            for rank in range(layout.pp)
        ),
        key=lambda m: m["total"],
    )
    recompute = _recompute_share(inv, layout, work)
    compute_s = _compute_seconds(inv, layout, work, cluster, recompute)
    keys = [rank_keys(layout, stages, rank) for rank in range(layout.pp)]
    # Muon: each rank orthogonalises its own experts and its share of the owned matrices
    muon_shapes = [muon_matrices(inv, layout, keys[rank]) for rank in range(layout.pp)]
    muon_flops = max(newton_schulz_flops(shapes) for shapes in muon_shapes)
    compute_s += muon_flops / (cluster.peak_tflops * 1e12 * cluster.matmul_efficiency)
    traffic = max(
        (rank_traffic(inv, layout, work, layout.rank_stages(rank), keys[rank], stages,
                      micro_batches, recompute, muon_shapes[rank])
         for rank in range(layout.pp)),
        key=lambda kinds: sum(kinds.values()),
    )  # fmt: skip
    memory_s = sum(traffic.values()) / (cluster.memory_gbps * 1e9 * cluster.memory_efficiency)
    # the pipeline rank whose collectives expose the most time sets the pace
    comm, times, exposed = max(
        (_exposed(communication(inv, layout, work, rank), layout, cluster, compute_s + memory_s)
         for rank in range(layout.pp)),
        key=lambda found: found[2],
    )  # fmt: skip
    idle = bubble(orders, tuple(float(len(layers)) for layers in stages))
    # eager launches run ahead of the device: the slower of the two sets the pace
    launches = 0
    if work.launches is not None:
        per_micro_batch = launches_per_micro_batch(
            work.launches, cfg, layout.micro_batch, work.seq_len, layout.tp
        )
        # recomputed forwards (and the look-ahead's) launch their share again; the optimizer
        # steps the rank's share of the layers, Muon's Newton-Schulz only what the rank owns
        for rank in range(layout.pp):
            share = sum(len(stages[s]) for s in layout.rank_stages(rank)) / cfg.num_layers
            mine = per_micro_batch * micro_batches * share * (1 + recompute)
            mine += optimizer_launches(inv, layout, work.launches, keys[rank], share)
            launches = max(launches, round(mine))
    host_s = launches * cluster.launch_us * 1e-6
    step_s = max(compute_s + memory_s + exposed, host_s) / (1 - idle)
    model_flops = model_flops_per_token(inv, work) * work.global_batch * work.seq_len
    mfu = model_flops / (step_s * layout.devices * cluster.peak_tflops * 1e12)
    parts = {"compute": compute_s, "memory traffic": memory_s, **times}
    parts["host (kernel launches)"] = host_s
    parts["pipeline bubble"] = step_s * idle
    return Estimate(
        layout=layout,
        memory_gib={k: v / GIB for k, v in memory.items()},
        comm_gib={k: v / GIB for k, v in comm.items()},
        traffic_gib={k: v / GIB for k, v in traffic.items()},
        compute_s=compute_s,
        memory_bound_s=memory_s,
        launches=launches,
        host_s=host_s,
        exposed_comm_s=exposed,
        bubble=idle,
        step_s=step_s,
        mfu=mfu,
        fits=memory["total"] / GIB <= cluster.device_memory_gib,
        dominant=max(parts, key=parts.get),
    )


def _exposed(comm: dict, layout: Layout, cluster: Cluster, compute_s: float) -> tuple:
    """(bytes, seconds per collective, seconds exposed): tp, ep and pp collectives on the
    critical path, FSDP/HSDP/DDP ones overlapped with compute (only their excess shows)."""
    times = comm_seconds(comm, layout, cluster)
    on_path = (*TP_COLLECTIVES, "ep_all_to_all", "engram_all_to_all", "pp_send_recv")
    # between backward and the optimizer step; host copies when the forward asks (no prefetch)
    on_path += ("engram_sparse_all_gather", "engram_host_copy", "muon_all_to_all")
    on_path += ("muon_dp_tp_all_to_all", "muon_tp_all_to_all")
    critical = sum(times[k] for k in on_path)
    overlapped = sum(t for k, t in times.items() if k not in on_path)
    return comm, times, critical + max(0.0, overlapped - compute_s)


def _rank_memory(
    inv, layout, work, pp_rank, stages, order, micro_batches, cluster
) -> dict[str, float]:
    cfg = inv.cfg
    mine = layout.rank_stages(pp_rank)
    keys = rank_keys(layout, stages, pp_rank)
    held = [g for g in inv.groups if g.layer in keys]
    whole = [g for g in held if whole_table(g, layout)]
    held = [g for g in held if g not in whole]
    sharded = sum(tp_local(g, layout) for g in held) / layout.dp_shard
    fsdp = layout.dp_shard > 1
    # Under FSDP with accumulation, gradients stay unsharded (as FSDP gathers the unit: a
    # tp shard, experts an ep shard) until the last micro-batch, unless they are
    # reduce-scattered after every one. Row-sharded Engram tables keep sharded gradients.
    accumulate_unsharded = micro_batches > 1 and not layout.fsdp_reduce_every_micro_batch
    grads = sharded
    if fsdp and accumulate_unsharded:
        rows = [g for g in held if row_sharded(g, layout)]
        tables = sum(tp_local(g, layout) for g in rows) / layout.dp_shard
        grads = sum(unit(g, layout) for g in held if g not in rows) + tables
    buffers = sum(inv.buffer_bytes.get(k, 0) for k in keys)
    if fsdp:
        units: dict[int, float] = {}
        for g in held:
            if g.block:
                units[g.layer] = units.get(g.layer, 0.0) + gathered(g, layout)
        root = sum(gathered(g, layout) for g in held if not g.block)
        block = max(units.values(), default=0.0)
        param_bytes = DTYPE_BYTES[work.param_dtype]
        buffers += (2 * block + root) * param_bytes + block * DTYPE_BYTES[work.reduce_dtype]
    # Whole tables: every row with AdamW's state; gradients of the rows a step looked up (an
    # upper bound), the data-parallel ranks' together once gathered.
    tables = sum(tp_local(g, layout) for g in whole)
    lookups = work.global_batch * work.seq_len
    row_bytes = 4 * cfg.engram.embed_dim + 8  # values and the int64 row id
    table_grads = sum(sparse_rows(g, cfg, lookups) for g in whole) * row_bytes
    on_device = 0.0 if layout.engram_host else 1.0
    # Muon and V4.1's Sinkhorn-balanced update keep one momentum buffer per element, AdamW
    # two moments
    muon = sum(tp_local(g, layout) for g in held if g.muon) / layout.dp_shard if layout.muon else 0
    balanced = 0.0
    if layout.balanced_tables:
        balanced = sum(tp_local(g, layout) for g in held if g.balanced) / layout.dp_shard
    one_buffer = muon + balanced
    memory = {
        "params": 4 * (sharded + on_device * tables),
        "grads": 4 * grads + on_device * table_grads,
        "optimizer": 8 * (sharded - one_buffer + on_device * tables) + 4 * one_buffer,
        "activations": _activations(inv, layout, work, {s: stages[s] for s in mine}, order),
        "buffers": float(buffers),
        "weight_casts": _weight_casts_bytes(held, layout, work),
    }
    state = memory["params"] + memory["optimizer"] + memory["buffers"]
    # The backward peak (the loss's backward, or a pipeline stage's last forward) holds the
    # gradients only where an earlier micro-batch of the step made them.
    backward = state + memory["activations"] + memory["weight_casts"]
    backward += memory["grads"] if micro_batches > 1 else 0.0
    muon_step = muon_step_bytes(inv, layout, keys)  # Muon's transient: a bucket's
    # AdamW's foreach step (torch's default on accelerators without the trainer's fused
    # step: a custom cluster's may be one): the square root of the second moments is one
    # float32 temporary the size of every element it updates (the fused step holds none)
    foreach = 4 * (sharded - one_buffer) if cluster.foreach_optimizer else 0.0
    step = state + memory["grads"] + max(muon_step, foreach)
    memory["total"] = max(backward, step)
    # host-resident tables, their AdamW state and gradients: host memory, not the device's
    memory["host"] = (1.0 - on_device) * (12 * tables + table_grads)
    # the spike guard's snapshots: the rank's parameters, module buffers and optimizer state
    # (train/snapshot.py), wherever they live
    own_buffers = sum(inv.buffer_bytes.get(k, 0) for k in keys)
    optimizer = 8 * (sharded - one_buffer + tables) + 4 * one_buffer
    memory["host"] += layout.host_snapshots * (4 * (sharded + tables) + own_buffers + optimizer)
    return memory


def _weight_casts_bytes(held: list, layout: Layout, work: Workload) -> float:
    """The bf16 casts of the float32 weights alive at the backward peak: every matmul
    weight's, kept for the step (train.weight_casts) or saved by the forward for its
    backward; with whole blocks recomputed and no kept casts, one block's. None where FSDP
    gathers bf16 parameters (buffers count the gathered units)."""
    fsdp_bf16 = layout.dp_shard > 1 and DTYPE_BYTES[work.param_dtype] == 2
    if not work.mixed_precision or fsdp_bf16:
        return 0.0
    if keeps_weight_casts(layout, work) or layout.activation_checkpoint != "full":
        return 2 * cast_weights(held, layout)
    blocks = {g.layer for g in held if g.block}
    return 2 * max((cast_weights([g for g in held if g.layer == b], layout) for b in blocks),
                   default=0.0)  # fmt: skip


def rank_keys(layout: Layout, stages: list[list[int]], pp_rank: int) -> set[int]:
    """The layer keys of every stage a pipeline rank runs."""
    mine = layout.rank_stages(pp_rank)
    return set().union(*(stage_keys(s, stages[s], layout.num_stages) for s in mine))


def _activations(inv, layout: Layout, work: Workload, stages: dict, order: list) -> float:
    """The peak of a rank's live activations over its schedule (pipeline_schedule.py), from
    what each of its stages saves per micro-batch, what a zero-bubble input backward leaves
    for the weight backward (the gradients of the matmul outputs: the weight gradients'
    inputs), and a transient: one block's recomputation, or the loss's chunk of logits."""
    cfg = inv.cfg
    act_bytes = 2 if work.mixed_precision else 4
    tokens = layout.micro_batch * work.seq_len
    keep = {"none": "all", "selective": "matmul", "full": "none"}[layout.activation_checkpoint]
    sp = layout.sequence_parallel
    saved, pending, transient = {}, {}, {}
    for stage, layers in stages.items():
        per_micro = weight_inputs = recompute = 0.0
        last = stage == layout.num_stages - 1
        for layer in stage_blocks(cfg, layers, last):
            block = (inv, layer, work.seq_len, act_bytes, work.attention, layout.tp, sp)
            full, kept = block_bytes(*block, "all"), block_bytes(*block, keep)
            if layout.activation_checkpoint == "full":  # the block's input is what it keeps
                kept = cfg.residual.streams * cfg.hidden_size * 4 / (layout.tp if sp else 1)
            per_micro += kept * tokens
            weight_inputs += block_bytes(*block, "matmul") * tokens
            recompute = max(recompute, (full - kept) * tokens)  # one block at a time
        loss = 0.0
        if last:
            weight = DTYPE_BYTES[work.param_dtype] if layout.dp_shard > 1 else 4  # FSDP's
            per_micro += bytes_per_token(head_terms(cfg, act_bytes), 1, False, "all") * tokens
            per_micro += head_weight_gradient_bytes(cfg, weight)
            loss = loss_transient_bytes(cfg, act_bytes, tokens, weight)
        saved[stage], pending[stage] = per_micro, weight_inputs
        transient[stage] = max(recompute, loss)
    return activation_peak(order, saved, pending, transient)


def _attention_flops_per_token(inv: Inventory, seq: int) -> float:
    """Forward FLOPs per token of the score and value products (2 x 2 per key and channel)."""
    cfg, a = inv.cfg, inv.cfg.attention
    total = 0.0
    for layer in range(cfg.num_layers + cfg.mtp.depth):
        if a.kind != "v4":
            total += 4 * cfg.hidden_size * seq / 2
            continue
        kind = a.layer_type(layer % cfg.num_layers)
        visible = seq / 2 / (a.csa_ratio if kind == "csa" else a.hca_ratio)
        compressed = {"sliding": 0, "csa": min(a.index_topk, visible), "hca": visible}[kind]
        keys = window_keys(a.sliding_window, seq) + compressed
        total += 4 * cfg.num_heads * a.head_dim * keys
        if kind == "csa":
            total += 2 * a.index_heads * a.index_head_dim * visible
    return total


def model_flops_per_token(inv: Inventory, work: Workload) -> float:
    """Training FLOPs per token: 3 x forward (matmuls with active parameters, attention)."""
    return 3 * (inv.matmul_flops_per_token() + _attention_flops_per_token(inv, work.seq_len))


def look_ahead_share(inv: Inventory, work: Workload) -> float:
    """Anticipatory Routing's look-ahead forward against a training step, in FLOPs: a
    forward without the output head, which it does not run (Transformer.forward's
    `routes_only`)."""
    training = model_flops_per_token(inv, work)
    head = sum(2 * t.numel for t in inv.params if t.name == head_weight_name(inv.cfg))
    return (training / 3 - head) / training


def _recompute_share(inv: Inventory, layout: Layout, work: Workload) -> float:
    """The share of a step's work run again: checkpointed forwards, the look-ahead forward."""
    recompute = {"none": 0.0, "selective": 0.1, "full": 1 / 3}[layout.activation_checkpoint]
    return recompute + (look_ahead_share(inv, work) if layout.anticipatory else 0.0)


def _compute_seconds(
    inv: Inventory, layout: Layout, work: Workload, cluster: Cluster, recompute: float
) -> float:
    flops = model_flops_per_token(inv, work)
    tokens_per_device = work.global_batch * work.seq_len / (layout.dp * layout.tp * layout.pp)
    achieved = cluster.peak_tflops * 1e12 * cluster.matmul_efficiency
    return flops * (1 + recompute) * tokens_per_device / achieved
