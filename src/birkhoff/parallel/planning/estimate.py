"""Memory, communication and step time of one layout, from a model's inventory.

Memory per device (the stage that needs most): parameters, gradients and AdamW state in
float32 at the share FSDP, tp and pp leave a rank (routed experts: split over ep and the
remaining dp_shard / ep, so over dp_shard in all; with gradient accumulation under FSDP the
gradients stay unsharded until the step's last micro-batch, as the trainer runs it), buffers
(the model's own, and FSDP's gathered units: two blocks in flight plus the root, and one
block's unsharded gradients), and activations (activations.py) for the micro-batches a stage
holds (1F1B: stage s holds pp - s).

Communication, bytes per step per device, by collective, with the payload as the trainer's
calls pass it: FSDP all-gather (the unsharded unit, in param_dtype, per micro-batch: blocks
in forward and again in backward, the root once) and reduce-scatter (the unsharded unit's
float32 gradients, once per step); HSDP all-reduce of the shards over dp_replicate; DDP's
all-reduce of every gradient; expert all-to-all (each routed token's hidden state, out and
back, forward and backward); tensor-parallel all-reduce (or all-gather plus reduce-scatter
with sequence parallelism) of every sublayer's output, forward and backward; pipeline
send/recv of the residual (and its gradient) per micro-batch.

Step time: matmul and attention FLOPs at `matmul_efficiency` of the peak; tp and ep
collectives on the critical path (no overlap: DualPipe-style overlap is not modelled);
FSDP and HSDP collectives overlapped with compute, only their excess exposed; the 1F1B
bubble (pp - 1) / (micro-batches + pp - 1) on top. MFU: model FLOPs (no recomputation)
over step time x devices x peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from birkhoff.parallel.config import ParallelConfig
from birkhoff.parallel.planning.activations import (
    block_terms,
    bytes_per_token,
    head_terms,
    window_keys,
)
from birkhoff.parallel.planning.cluster import Cluster
from birkhoff.parallel.planning.inventory import FIRST, LAST, Inventory

GIB = 2**30
MATMUL_EFFICIENCY = 0.6  # share of the bf16 peak large training matmuls reach (assumed)
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
    fsdp_reduce_every_micro_batch: bool = False

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
            "parallel.fsdp_reduce_every_micro_batch": str(
                self.fsdp_reduce_every_micro_batch
            ).lower(),
            "train.micro_batch_size": self.micro_batch,
        }
        return [f"{key}={value}" for key, value in values.items()]


def layout_of(parallel: ParallelConfig, micro_batch: int, devices: int) -> Layout:
    """The Layout a recipe's `parallel` section gives on `devices` (validated)."""
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
        fsdp_reduce_every_micro_batch=parallel.fsdp_reduce_every_micro_batch,
    )


@dataclass(frozen=True)
class Workload:
    global_batch: int  # sequences per step
    seq_len: int
    mixed_precision: bool = True  # bf16 autocast (activations in bf16)
    # Attention that keeps no score matrix for backward (FlashAttention-style kernels); the
    # reference kernels keep the logits and probabilities.
    fused_attention: bool = False
    positions: bool = True  # document positions travel between pipeline stages
    loader_rows: bool = True  # Engram rows computed by the loader travel with them
    param_dtype: str = "bfloat16"  # FSDP's gathered parameters
    reduce_dtype: str = "float32"


@dataclass
class Estimate:
    layout: Layout
    memory_gib: dict[str, float]  # per device, the fullest stage
    comm_gib: dict[str, float]  # bytes per step per device, by collective
    compute_s: float
    exposed_comm_s: float
    bubble: float
    step_s: float
    mfu: float
    fits: bool
    dominant: str  # what takes most of the step: compute, a collective, or the bubble

    def as_dict(self) -> dict:
        return {**asdict(self), "layout": asdict(self.layout)}


def stage_layers(num_layers: int, pp: int) -> list[list[int]]:
    """The trainer's even split; layers that do not divide go one each to the first stages
    (a published run with an uneven split)."""
    per, extra = divmod(num_layers, pp)
    sizes = [per + (s < extra) for s in range(pp)]
    starts = [sum(sizes[:s]) for s in range(pp)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes, strict=True)]


def estimate(inv: Inventory, layout: Layout, work: Workload, cluster: Cluster) -> Estimate:
    cfg = inv.cfg
    micro_batches = work.global_batch // (layout.micro_batch * layout.dp)
    stages = stage_layers(cfg.num_layers, layout.pp)
    memory = max(
        (
            _stage_memory(inv, layout, work, s, layers, micro_batches)
            for s, layers in enumerate(stages)
        ),
        key=lambda m: m["total"],
    )
    comm = communication(inv, layout, work)
    compute_s = _compute_seconds(inv, layout, work, cluster)
    times = _comm_seconds(comm, layout, cluster)
    on_path = ("tp", "ep_all_to_all", "engram_all_to_all", "pp_send_recv")
    critical = sum(times[k] for k in on_path)
    overlapped = sum(t for k, t in times.items() if k not in on_path)
    exposed = critical + max(0.0, overlapped - compute_s)
    bubble = (layout.pp - 1) / (micro_batches + layout.pp - 1) if layout.pp > 1 else 0.0
    step_s = (compute_s + exposed) / (1 - bubble)
    model_flops = model_flops_per_token(inv, work) * work.global_batch * work.seq_len
    mfu = model_flops / (step_s * layout.devices * cluster.peak_tflops * 1e12)
    parts = {"compute": compute_s, **times, "pipeline bubble": step_s * bubble}
    return Estimate(
        layout=layout,
        memory_gib={k: v / GIB for k, v in memory.items()},
        comm_gib={k: v / GIB for k, v in comm.items()},
        compute_s=compute_s,
        exposed_comm_s=exposed,
        bubble=bubble,
        step_s=step_s,
        mfu=mfu,
        fits=memory["total"] / GIB <= cluster.device_memory_gib,
        dominant=max(parts, key=parts.get),
    )


def _stage_keys(stage: int, layers: list[int], pp: int) -> set[int]:
    return set(layers) | ({FIRST} if stage == 0 else set()) | ({LAST} if stage == pp - 1 else set())


def _tp_local(g, layout: Layout) -> float:
    return g.numel / (layout.tp if g.tp_split else 1)


def _unit(g, layout: Layout) -> float:
    """Elements of a group in its FSDP unit before sharding: its tp shard (experts: their ep
    shard)."""
    return _tp_local(g, layout) / (layout.ep if g.expert else 1)


def _row_sharded(g, layout: Layout) -> bool:
    return g.engram_table and layout.engram_row_shard


def _gathered(g, layout: Layout) -> float:
    """Elements FSDP gathers of a group on a rank: none of a row-sharded Engram table, none of
    the experts when ep takes all of dp_shard (their unit's shard group is one rank)."""
    if _row_sharded(g, layout):
        return 0.0
    if g.expert and layout.dp_shard == layout.ep:
        return 0.0
    return _unit(g, layout)


def _stage_memory(inv, layout, work, stage, layers, micro_batches) -> dict[str, float]:
    cfg = inv.cfg
    keys = _stage_keys(stage, layers, layout.pp)
    held = [g for g in inv.groups if g.layer in keys]
    sharded = sum(_tp_local(g, layout) for g in held) / layout.dp_shard
    fsdp = layout.dp_shard > 1
    # Under FSDP with accumulation, gradients stay unsharded (as FSDP gathers the unit: a
    # tp shard, experts an ep shard) until the last micro-batch, unless they are
    # reduce-scattered after every one. Row-sharded Engram tables keep sharded gradients.
    accumulate_unsharded = micro_batches > 1 and not layout.fsdp_reduce_every_micro_batch
    grads = sharded
    if fsdp and accumulate_unsharded:
        row_sharded = [g for g in held if g.engram_table and layout.engram_row_shard]
        tables = sum(_tp_local(g, layout) for g in row_sharded) / layout.dp_shard
        grads = sum(_unit(g, layout) for g in held if g not in row_sharded) + tables
    buffers = sum(inv.buffer_bytes.get(k, 0) for k in keys)
    if fsdp:
        units: dict[int, float] = {}
        for g in held:
            if g.block:
                units[g.layer] = units.get(g.layer, 0.0) + _gathered(g, layout)
        root = sum(_gathered(g, layout) for g in held if not g.block)
        block = max(units.values(), default=0.0)
        param_bytes = DTYPE_BYTES[work.param_dtype]
        buffers += (2 * block + root) * param_bytes + block * DTYPE_BYTES[work.reduce_dtype]
    memory = {
        "params": 4 * sharded,
        "grads": 4 * grads,
        "optimizer": 8 * sharded,
        "activations": _activations(cfg, layout, work, stage, layers, micro_batches),
        "buffers": float(buffers),
    }
    memory["total"] = sum(memory.values())
    return memory


def _activations(cfg, layout: Layout, work: Workload, stage, layers, micro_batches) -> float:
    act_bytes = 2 if work.mixed_precision else 4
    tokens = layout.micro_batch * work.seq_len
    keep = {"none": "all", "selective": "matmul", "full": "none"}[layout.activation_checkpoint]
    sp = layout.sequence_parallel
    per_micro = recompute = 0.0
    last = stage == layout.pp - 1
    mtp = range(cfg.num_layers, cfg.num_layers + cfg.mtp.depth) if last else range(0)
    for layer in [*layers, *mtp]:
        terms = block_terms(cfg, layer, work.seq_len, act_bytes, work.fused_attention)
        full = bytes_per_token(terms, layout.tp, sp, "all")
        saved = bytes_per_token(terms, layout.tp, sp, keep)
        if layout.activation_checkpoint == "full":  # the block's input is what it keeps
            streams = 1 if cfg.residual.mode == "plain" else cfg.residual.n_streams
            saved = streams * cfg.hidden_size * 4 / (layout.tp if sp else 1)
        per_micro += saved * tokens
        recompute = max(recompute, (full - saved) * tokens)  # one block recomputed at a time
    if last:
        per_micro += bytes_per_token(head_terms(cfg, act_bytes), 1, False, "all") * tokens
    in_flight = min(layout.pp - stage, micro_batches) if layout.pp > 1 else 1
    return per_micro * in_flight + recompute


COLLECTIVES = (
    "fsdp_all_gather",
    "fsdp_reduce_scatter",
    "hsdp_all_reduce",
    "ddp_all_reduce",
    "ddp_broadcast",
    "ep_all_to_all",
    "engram_all_to_all",
    "tp",
    "pp_send_recv",
)


def communication(inv: Inventory, layout: Layout, work: Workload, stage: int = 0) -> dict:
    """Bytes per step a rank of pipeline stage `stage` moves, by collective (module
    docstring); routed tokens assume a balanced load (the mean over the ep ranks)."""
    cfg = inv.cfg
    layers = stage_layers(cfg.num_layers, layout.pp)[stage]
    last = stage == layout.pp - 1
    micro_batches = work.global_batch // (layout.micro_batch * layout.dp)
    act = 2 if work.mixed_precision else 4
    tokens = layout.micro_batch * work.seq_len
    held = [g for g in inv.groups if g.layer in _stage_keys(stage, layers, layout.pp)]
    comm = dict.fromkeys(COLLECTIVES, 0.0)
    gathered = sum(_gathered(g, layout) for g in held)
    if layout.dp_shard > 1:
        blocks = sum(_gathered(g, layout) for g in held if g.block)
        per_micro = (2 * blocks + (gathered - blocks)) * DTYPE_BYTES[work.param_dtype]
        comm["fsdp_all_gather"] = micro_batches * per_micro
        reductions = micro_batches if layout.fsdp_reduce_every_micro_batch else 1
        comm["fsdp_reduce_scatter"] = reductions * gathered * DTYPE_BYTES[work.reduce_dtype]
        if layout.dp_replicate > 1:  # FSDP's shards once; row-sharded tables every micro-batch
            tables = sum(_tp_local(g, layout) for g in held if _row_sharded(g, layout))
            rest = sum(_tp_local(g, layout) for g in held) - tables
            comm["hsdp_all_reduce"] = (rest + micro_batches * tables) / layout.dp_shard * 4
    elif layout.dp_replicate > 1:  # every gradient; every buffer from rank 0 each forward
        comm["ddp_all_reduce"] = sum(_tp_local(g, layout) for g in held) * 4
        buffers = _stage_keys(stage, layers, layout.pp)
        comm["ddp_broadcast"] = micro_batches * sum(inv.buffer_bytes.get(k, 0) for k in buffers)
    # (layer, positions it runs on per sequence): MTP depth k predicts k tokens further
    depths = range(cfg.mtp.depth) if last else range(0)
    runs = [(layer, work.seq_len) for layer in layers]
    runs += [(cfg.num_layers + d, work.seq_len - d - 1) for d in depths]
    sp = layout.tp if layout.sequence_parallel else 1
    if layout.ep > 1:
        routed = sum(layout.micro_batch * n for layer, n in runs if cfg.moe.is_moe_layer(layer))
        routed *= cfg.moe.top_k / sp
        comm["ep_all_to_all"] = micro_batches * 4 * routed * cfg.hidden_size * act
    if layout.engram_row_shard and layout.dp_shard > 1:
        lookups = _engram_lookup_bytes(cfg, layout, layers, tokens)
        comm["engram_all_to_all"] = micro_batches * lookups
    if layout.tp > 1:
        comm["tp"] = micro_batches * len(layers) * 2 * 2 * tokens * cfg.hidden_size * act
    if layout.pp > 1:
        comm["pp_send_recv"] = micro_batches * _pipeline_bytes(cfg, work, layout, stage, tokens)
    return comm


def _engram_lookup_bytes(cfg, layout: Layout, layers: list[int], tokens: int) -> float:
    """Per micro-batch, row-sharded Engram lookups: the row ids out (int64), the rows back
    and their gradients (float32); a recomputed block asks for its ids again (selective
    checkpointing keeps the rows the collective returned; full recomputes them too)."""
    e = cfg.engram
    heads = e.heads_per_order * (e.max_ngram - 1)
    rows = tokens * heads * len([layer for layer in layers if layer in e.layers])
    recomputed = {"none": 0, "selective": 8, "full": 8 + e.embed_dim * 4}
    return rows * (8 + 2 * e.embed_dim * 4 + recomputed[layout.activation_checkpoint])


def _pipeline_bytes(cfg, work: Workload, layout: Layout, stage: int, tokens: int) -> float:
    """What crosses the boundaries of `stage` per micro-batch (one for the first and the last
    stage, two between), forward and backward: the residual (float32 streams) and its
    gradient, the token ids, targets and document positions, every loader-computed Engram
    row (they travel to the end), and Emb(targets) with its gradient for MTP."""
    streams = 1 if cfg.residual.mode == "plain" else cfg.residual.n_streams
    ids = 2 + int(work.positions)
    e = cfg.engram
    rows = len(e.layers) * e.heads_per_order * (e.max_ngram - 1) if work.loader_rows else 0
    per_token = 2 * streams * cfg.hidden_size * 4 + ids * 8 + rows * 8
    per_token += 2 * cfg.hidden_size * 4 if cfg.mtp.depth else 0
    boundaries = 1 if stage in (0, layout.pp - 1) else 2
    return boundaries * tokens * per_token


def _comm_seconds(comm: dict[str, float], layout: Layout, cluster: Cluster) -> dict[str, float]:
    """Ring collectives: (g - 1) / g of the payload crosses each device's link (all-reduce
    twice); a group inside one node uses the node's links, else the NICs."""

    def bandwidth(span: int) -> float:
        return (
            cluster.intra_node_gbps if span <= cluster.node_size else cluster.inter_node_gbps
        ) * 1e9

    tp_span = layout.tp
    groups = {
        "fsdp_all_gather": (layout.dp_shard, tp_span * layout.dp_shard, 1),
        "fsdp_reduce_scatter": (layout.dp_shard, tp_span * layout.dp_shard, 1),
        "hsdp_all_reduce": (layout.dp_replicate, layout.devices // layout.pp, 2),
        "ddp_all_reduce": (layout.dp_replicate, layout.devices // layout.pp, 2),
        "ddp_broadcast": (layout.dp_replicate, layout.devices // layout.pp, 1),
        "ep_all_to_all": (layout.ep, tp_span * layout.ep, 1),
        "engram_all_to_all": (layout.dp_shard, tp_span * layout.dp_shard, 1),
        "tp": (layout.tp, tp_span, 2),
        "pp_send_recv": (2, layout.devices, 1),
    }
    seconds = {}
    for name, payload in comm.items():
        size, span, factor = groups[name]
        share = (size - 1) / size if name != "pp_send_recv" else 1.0
        seconds[name] = factor * payload * share / bandwidth(span) if size > 1 else 0.0
    return seconds


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


def _compute_seconds(inv: Inventory, layout: Layout, work: Workload, cluster: Cluster) -> float:
    flops = model_flops_per_token(inv, work)
    recompute = {"none": 0.0, "selective": 0.1, "full": 1 / 3}[layout.activation_checkpoint]
    tokens_per_device = work.global_batch * work.seq_len / (layout.dp * layout.tp * layout.pp)
    achieved = cluster.peak_tflops * 1e12 * MATMUL_EFFICIENCY
    return flops * (1 + recompute) * tokens_per_device / achieved
