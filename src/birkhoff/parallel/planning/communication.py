"""Bytes per step of every collective a rank of a layout runs, and the time they take (see
estimate.py's docstring for what each counts)."""

from __future__ import annotations

from birkhoff.parallel.planning.cluster import Cluster
from birkhoff.parallel.planning.inventory import Inventory, TensorInfo
from birkhoff.parallel.planning.layout import (
    DTYPE_BYTES,
    Layout,
    Workload,
    gathered,
    row_sharded,
    sparse_rows,
    stage_keys,
    stage_layers,
    tp_local,
    whole_table,
)

COLLECTIVES = (
    "fsdp_all_gather",
    "fsdp_reduce_scatter",
    "hsdp_all_reduce",
    "ddp_all_reduce",
    "ddp_broadcast",
    "ep_all_to_all",
    "engram_all_to_all",
    "engram_sparse_all_gather",
    "engram_host_copy",
    "muon_all_to_all",
    "muon_dp_tp_all_to_all",
    "muon_tp_all_to_all",
    "tp_all_reduce",
    "tp_all_gather",
    "tp_reduce_scatter",
    "pp_send_recv",
)
TP_COLLECTIVES = ("tp_all_reduce", "tp_all_gather", "tp_reduce_scatter")


def communication(inv: Inventory, layout: Layout, work: Workload, pp_rank: int = 0) -> dict:
    """Bytes per step a rank of pipeline rank `pp_rank` moves, by collective (module
    docstring), over the stages it runs; routed tokens assume a balanced load (the mean over
    the ep ranks)."""
    comm = dict.fromkeys(COLLECTIVES, 0.0)
    for stage in layout.rank_stages(pp_rank):
        for name, size in _stage_communication(inv, layout, work, stage).items():
            comm[name] += size
    return comm


def _stage_communication(inv: Inventory, layout: Layout, work: Workload, stage: int) -> dict:
    cfg = inv.cfg
    layers = stage_layers(cfg.num_layers, layout.num_stages)[stage]
    keys = stage_keys(stage, layers, layout.num_stages)
    last = stage == layout.num_stages - 1
    micro_batches = work.global_batch // (layout.micro_batch * layout.dp)
    act = 2 if work.mixed_precision else 4
    tokens = layout.micro_batch * work.seq_len
    held = [g for g in inv.groups if g.layer in keys]
    comm = dict.fromkeys(COLLECTIVES, 0.0)
    whole = [g for g in held if whole_table(g, layout)]
    if whole and layout.dp > 1:
        lookups = micro_batches * tokens
        comm["engram_sparse_all_gather"] = _sparse_gather_bytes(cfg, layout, whole, lookups)
    if whole and layout.engram_host:
        comm["engram_host_copy"] = micro_batches * _host_copy_bytes(cfg, layout, whole, tokens)
    held = [g for g in held if g not in whole]  # the tables' gradients are reduced there
    gathered_total = sum(gathered(g, layout) for g in held)
    if layout.dp_shard > 1:
        blocks = sum(gathered(g, layout) for g in held if g.block)
        per_micro = (2 * blocks + (gathered_total - blocks)) * DTYPE_BYTES[work.param_dtype]
        comm["fsdp_all_gather"] = micro_batches * per_micro
        if layout.anticipatory:  # the look-ahead forward gathers every block once more; the
            # root, kept gathered after a forward, is gathered once by it and then not again
            # by the step's first forward (measured: fsdp=4 x ep=2, tests/test_parallel.py)
            comm["fsdp_all_gather"] += micro_batches * blocks * DTYPE_BYTES[work.param_dtype]
        reductions = micro_batches if layout.fsdp_reduce_every_micro_batch else 1
        comm["fsdp_reduce_scatter"] = reductions * gathered_total * DTYPE_BYTES[work.reduce_dtype]
        if layout.dp_replicate > 1:  # FSDP's shards once; row-sharded tables every micro-batch
            tables = sum(tp_local(g, layout) for g in held if row_sharded(g, layout))
            rest = sum(tp_local(g, layout) for g in held) - tables
            comm["hsdp_all_reduce"] = (rest + micro_batches * tables) / layout.dp_shard * 4
    elif layout.dp_replicate > 1:  # every gradient; every buffer from rank 0 each forward
        comm["ddp_all_reduce"] = sum(tp_local(g, layout) for g in held) * 4
        comm["ddp_broadcast"] = micro_batches * sum(inv.buffer_bytes.get(k, 0) for k in keys)
    # (layer, positions it runs on per sequence): MTP depth k predicts k tokens further
    depths = range(cfg.mtp.depth) if last else range(0)
    runs = [(layer, work.seq_len) for layer in layers]
    runs += [(cfg.num_layers + d, work.seq_len - d - 1) for d in depths]
    sp = layout.tp if layout.sequence_parallel else 1
    if layout.ep > 1:  # the main blocks route their slice of the sequence, MTP all of it
        routed = sum(
            layout.micro_batch * n / (sp if layer < cfg.num_layers else 1)
            for layer, n in runs
            if cfg.moe.is_moe_layer(layer)
        )
        routed *= cfg.moe.top_k
        exchanges = 4 + (2 if layout.anticipatory else 0)  # forward 2, backward 2, look-ahead 2
        comm["ep_all_to_all"] = micro_batches * exchanges * routed * cfg.hidden_size * act
    if layout.engram_row_shard and layout.dp_shard > 1:
        lookups = _engram_lookup_bytes(cfg, layout, layers, tokens)
        comm["engram_all_to_all"] = micro_batches * lookups
    if layout.tp > 1:
        per_micro = _tensor_parallel_bytes(cfg, layout, runs, act, work.seq_len)
        for name, size in per_micro.items():
            comm[name] = micro_batches * size
        # sequence parallelism: what the main blocks run on their slice, summed once a step
        if layout.sequence_parallel:
            local = sum(tp_local(g, layout) for g in held if g.sequence_local)
            comm["tp_all_reduce"] += local / layout.dp_shard * 4
    if layout.pp > 1:
        comm["pp_send_recv"] = micro_batches * _pipeline_bytes(cfg, work, layout, stage, tokens)
    if layout.muon:
        comm.update(_muon_bytes(inv, layout, keys))
    return comm


def muon_owner_group(layout: Layout, t: TensorInfo) -> int:
    """The ranks among which one owner orthogonalises a (non-expert) matrix
    (parallel/muon_exchange.py): those that shard it, dp_shard under FSDP times tp where tp
    splits it (HSDP's replicas each have their owner); 1 where every rank computes it: a
    replicated matrix, and a column-parallel one under fsdp x tp whose rows do not split
    evenly over tp x dp_shard (FSDP's strided shard of it, which FSDP2 and DTensor cut
    differently). Routed experts are sharded by expert only: never assembled."""
    strided = layout.dp_shard > 1 and layout.tp > 1 and t.tp_rows
    if strided and t.matrices[1] % (layout.tp * layout.dp_shard):
        return 1
    dp = layout.dp_shard if layout.dp_shard > 1 else 1
    return dp * (layout.tp if t.tp_split and layout.tp > 1 else 1)


def muon_key(name: str, layout: Layout, keys: set[int]) -> tuple:
    """What Muon's plan of a rank depends on (Inventory.remembered's key): the degrees its
    owner groups and expert shares read (muon_owner_group, muon.py's _local_count) and the
    rank's layers."""
    return (name, layout.dp_shard, layout.tp, frozenset(keys))


def muon_exchange_name(layout: Layout, t: TensorInfo) -> str | None:
    """The collective that carries a matrix's shards to its owner and back: an all-to-all
    over dp_shard, over dp_shard x tp, or over tp; None where it has no owner."""
    if muon_owner_group(layout, t) == 1:
        return None
    tp_split = t.tp_split and layout.tp > 1
    if layout.dp_shard > 1:
        return "muon_dp_tp_all_to_all" if tp_split else "muon_all_to_all"
    return "muon_tp_all_to_all"


def _muon_bytes(inv: Inventory, layout: Layout, keys: set[int]) -> dict[str, float]:
    """Per step, Muon's two all-to-alls of the sharded matrices of the stage keys `keys`
    (float32 Nesterov inputs to the owners, updates back): each rank sends its shard of every
    matrix, and an owner the shards of the matrices it owns (the mean over the owners:
    numel / g), each time counting the input (the part a rank keeps included)."""
    key = muon_key("muon_bytes", layout, keys)
    return dict(inv.remembered(key, lambda: _muon_exchange_bytes(inv, layout, keys)))


def _muon_exchange_bytes(inv: Inventory, layout: Layout, keys: set[int]) -> dict[str, float]:
    comm = dict.fromkeys(("muon_all_to_all", "muon_dp_tp_all_to_all", "muon_tp_all_to_all"), 0.0)
    for t in inv.params:
        if not t.matrices or t.expert or t.layer not in keys:
            continue
        name = muon_exchange_name(layout, t)
        if name is not None:
            comm[name] += 2 * 4 * t.numel / muon_owner_group(layout, t)
    return comm


def _tensor_parallel_bytes(cfg, layout: Layout, runs, act: int, seq: int) -> dict:
    """Per micro-batch, tp's collectives in the blocks of `runs` ((layer, positions)), as
    the blocks' plans run them. A sublayer's output: all-reduced, or with sequence
    parallelism reduce-scattered (forward) and all-gathered (backward), its input gathered
    (forward) and reduce-scattered (backward) where the gradient is partial. Each
    column-parallel layer's input gradient is all-reduced (its own, without sequence
    parallelism); V4 attention also shares its query latent and KV entry (their gradients
    summed), the compressed entries and the indexer's keys, and sums the indexer's scores
    over heads. Engram and the stage's output gather the streams under sequence
    parallelism. A checkpointed block repeats its forward's collectives when it recomputes:
    all of them (full), or those selective checkpointing does not keep (the gathers and
    the c10d sums; it keeps functional all-reduces and reduce-scatters)."""
    c, a, moe = cfg.hidden_size, cfg.attention, cfg.moe
    streams = cfg.residual.streams
    forward, recomputed, backward = (dict.fromkeys(TP_COLLECTIVES, 0.0) for _ in range(3))
    batch = layout.micro_batch
    for layer, positions in runs:
        tokens = batch * positions
        sp = layout.sequence_parallel and layer < cfg.num_layers  # MTP runs whole
        sublayers = 1 if moe.is_moe_layer(layer) and not moe.num_shared_experts else 2
        # column-parallel inputs: the FFN's gate and up (dense or shared experts), GQA's q, k, v
        inputs = {"ffn": 2, "attention": 3 if a.kind != "v4" else 0}
        for sublayer in ("attention", "ffn")[:sublayers]:
            if sp:
                forward["tp_reduce_scatter"] += tokens * c * act  # the output
                forward["tp_all_gather"] += tokens * c * act  # the input
                recomputed["tp_all_gather"] += tokens * c * act
                backward["tp_all_gather"] += tokens * c * act  # the output's gradient
                # V4 attention's input gradient is complete on every rank (a local slice)
                if not (sublayer == "attention" and a.kind == "v4"):
                    backward["tp_reduce_scatter"] += tokens * c * act
            else:
                forward["tp_all_reduce"] += tokens * c * act
                backward["tp_all_reduce"] += inputs[sublayer] * tokens * c * act
        if a.kind == "v4":
            backward["tp_all_reduce"] += tokens * (a.q_lora_rank + a.head_dim) * act
            shared, summed = _v4_entry_bytes(cfg, layer % cfg.num_layers, positions, batch, act)
            backward["tp_all_reduce"] += shared
            forward["tp_all_reduce"] += summed
            recomputed["tp_all_reduce"] += summed
        if sp and layer in cfg.engram.layers:
            gathered = tokens * streams * c * act
            forward["tp_all_gather"] += gathered
            recomputed["tp_all_gather"] += gathered
            backward["tp_all_gather"] += gathered
    repeat = {"none": None, "selective": recomputed, "full": forward}[layout.activation_checkpoint]
    # Anticipatory Routing's look-ahead forward runs the forward's collectives once more
    again = 2 if layout.anticipatory else 1
    sums = {k: again * forward[k] + backward[k] + (repeat[k] if repeat else 0.0) for k in forward}
    if layout.sequence_parallel:  # the stage's output, gathered for the head or the next stage
        sums["tp_all_gather"] += (1 + again) * batch * seq * streams * c * act
    return sums


def _v4_entry_bytes(cfg, layer: int, positions: int, batch: int, act: int) -> tuple:
    """A compressed layer's tp sums per micro-batch: (backward: the entries' and the indexer
    keys' gradients; forward, CSA: the indexer's scores over every entry and at its picks,
    the attention mass at the picks and the indexer's target, in float32)."""
    a = cfg.attention
    kind = a.layer_type(layer)
    if kind == "sliding":
        return 0.0, 0.0
    entries = positions / (a.csa_ratio if kind == "csa" else a.hca_ratio)
    shared = batch * entries * a.head_dim * act
    if kind == "hca":
        return shared, 0.0
    shared += batch * entries * a.index_head_dim * 4
    summed = (batch * positions * (entries + 2 * a.index_topk) + positions * entries) * 4
    return shared, summed


def _sparse_gather_bytes(cfg, layout: Layout, tables: list, lookups: int) -> float:
    """Per step, the gather of whole tables' sparse gradients over dp: per table the row
    counts (int64), then every rank's rows padded to the longest (int64 ids and float32
    values); a rank's rows are at most its `lookups` token positions' (an upper bound)."""
    row_bytes = 8 + 4 * cfg.engram.embed_dim
    return layout.dp * sum(8 + sparse_rows(g, cfg, lookups) * row_bytes for g in tables)


def _host_copy_bytes(cfg, layout: Layout, tables: list, tokens: int) -> float:
    """Per micro-batch, host-resident tables: the row ids to the host (int64), the rows to
    the device and their gradients back (float32), for every lookup; a fully recomputed
    block looks its rows up again."""
    e = cfg.engram
    lookups = tokens * e.hash_heads * len(tables)
    again = 8 + 4 * e.embed_dim if layout.activation_checkpoint == "full" else 0
    return lookups * (8 + 4 * e.embed_dim + 4 * e.embed_dim + again)


def _engram_lookup_bytes(cfg, layout: Layout, layers: list[int], tokens: int) -> float:
    """Per micro-batch, row-sharded Engram lookups: the row ids out (int64), the rows back
    and their gradients (float32); a recomputed block asks for its ids again (selective
    checkpointing keeps the rows the collective returned; full recomputes them too), and so
    does Anticipatory Routing's look-ahead forward (ids and rows)."""
    e = cfg.engram
    heads = e.hash_heads
    rows = tokens * heads * len([layer for layer in layers if layer in e.layers])
    recomputed = {"none": 0, "selective": 8, "full": 8 + e.embed_dim * 4}
    lookahead = 8 + e.embed_dim * 4 if layout.anticipatory else 0
    return rows * (8 + 2 * e.embed_dim * 4 + recomputed[layout.activation_checkpoint] + lookahead)


def _pipeline_bytes(cfg, work: Workload, layout: Layout, stage: int, tokens: int) -> float:
    """What crosses the boundaries of `stage` per micro-batch (one for the first and the last
    stage, two between), forward and backward: the residual (float32 streams) and its
    gradient, the token ids, targets and document positions, every loader-computed Engram
    row (they travel to the end), and Emb(targets) with its gradient for MTP; and with
    Anticipatory Routing the look-ahead forward's (the forward's again)."""
    streams = cfg.residual.streams
    ids = 2 + int(work.positions)
    e = cfg.engram
    rows = len(e.layers) * e.hash_heads if work.loader_rows else 0
    gradients = streams * cfg.hidden_size * 4 + (cfg.hidden_size * 4 if cfg.mtp.depth else 0)
    forward = gradients + ids * 8 + rows * 8  # the residual (and Emb(targets)), ids, rows
    per_token = forward * (2 if layout.anticipatory else 1) + gradients
    boundaries = 1 if stage in (0, layout.num_stages - 1) else 2
    return boundaries * tokens * per_token


def comm_seconds(comm: dict[str, float], layout: Layout, cluster: Cluster) -> dict[str, float]:
    """Ring collectives: (g - 1) / g of the payload crosses each device's link (all-reduce
    twice); a group inside one node uses the node's links, else the NICs. Muon's all-to-alls
    (owners round-robin by size: each rank sends and receives about the same) as a ring's."""

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
        "engram_sparse_all_gather": (layout.dp, layout.devices // layout.pp, 1),
        "muon_all_to_all": (layout.dp_shard, tp_span * layout.dp_shard, 1),
        "muon_dp_tp_all_to_all": (layout.dp_shard * layout.tp, tp_span * layout.dp_shard, 1),
        "muon_tp_all_to_all": (layout.tp, tp_span, 1),
        "tp_all_reduce": (layout.tp, tp_span, 2),
        "tp_all_gather": (layout.tp, tp_span, 1),
        "tp_reduce_scatter": (layout.tp, tp_span, 1),
        "pp_send_recv": (2, layout.devices, 1),
    }
    seconds = {}
    for name, payload in comm.items():
        if name == "engram_host_copy":  # the device's own PCIe link, no ring
            seconds[name] = payload / (cluster.host_gbps * 1e9)
            continue
        size, span, factor = groups[name]
        share = (size - 1) / size if name != "pp_send_recv" else 1.0
        seconds[name] = factor * payload * share / bandwidth(span) if size > 1 else 0.0
    return seconds
