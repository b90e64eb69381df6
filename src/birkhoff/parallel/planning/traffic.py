"""Device-memory traffic of a step: what the elementwise kernels move, which runs at the memory
bandwidth, not the matmul peak. Bytes per step on one device, by kind:

- optimizer: torch's AdamW moves 84 bytes per float32 element it updates (decoupled decay
  p *= 1 - lr wd: read and write p, 8; m = lerp(m, g): read m and g, write m, 12; v *= beta2,
  8; v += (1 - beta2) g g: read v, g, g, write v, 16; sqrt(v), 8; / bias correction, 8; + eps,
  8; p -= lr m / denominator: read p, m and it, write p, 16), 76 without weight decay (Engram
  tables; a whole table with sparse updates only its touched rows, none of a host-resident
  one; V4.1's Sinkhorn-balanced update is counted as AdamW). Muon (train/muon.py) moves 72
  bytes per element around Newton-Schulz (momentum m = mu m + g, 20; Nesterov g + mu m, 12;
  the Frobenius norm and division, 12; the RMS scale, 8; decay, 8; p -= lr O, 12), per
  iteration on a matrix with n <= m sides 12 n^2 beside its matmuls, whose FLOPs the compute
  time counts (b I + c A: read A and b I, write; the batched product that adds a I copies it
  into its output first, n^2 written and read, counted as the product's), and per run (a
  shape's batch) 36 n^2 (the identity, and a I and b I for each of V4's two coefficient sets;
  its 10 iterations as everywhere in the plan);
- gradients: the norm reads every gradient and, when it clips, scales it (12 bytes per
  element); each micro-batch after the first adds its gradients to the accumulated ones (12),
  or, for the routed experts with the casts kept for the step, its bf16 gradients to their
  float32 sum in the cast's backward (10, and no cast of its own: model/step_casts.py);
- mixed precision: the forward casts the float32 weights it computes with to bf16 (read 4,
  write 2), once a step where the casts are kept across its micro-batches (train.weight_casts,
  layout.keeps_weight_casts), else in every micro-batch; every micro-batch's backward casts
  their bf16 gradients back to float32 (6); under FSDP with bf16 parameters the forward's
  cast is of the rank's shard, before the gather (a recomputation's casts are not counted);
- activations: the forward and backward elementwise kernels (norms, mHC's maps and stream
  mixes, activations, softmax, routing, casts) read and write ACTIVATION_TRAFFIC times the
  bytes autograd saves (activations.py), by the kernel backend the devices run and by the
  residual (several streams or plain), and recomputation runs its forward again. The factors
  are counted on this CPU (kernels/moved_bytes.py: every aten op's inputs and outputs but the
  matmuls', mHC's n x n stream mixes counted with the elementwise ops; every interpreted
  Triton launch's distinct addresses loaded and stored; per token, in float32;
  benchmarks/activation_traffic.py, benchmarks/results/activation_traffic_2026-12-07.json):
  with mHC the reference kernels 13.8 at `small`'s widths and 11.6 at a 16B-class shape's
  (hidden 1024, 8 experts of 704, top 6; 15.5 at `tiny`'s, where fixed-width terms weigh
  more), the triton backend's 6.8 and 5.4; with a plain residual at the 16B-class widths 8.5
  and 3.9 (11.9 at `tiny`'s for the reference). The triton kernels fuse mHC's merge (the
  streams and the layer's output read once, the next streams written once) and the norms,
  SwiGLU and RoPE; V4 attention's core is counted as the reference's, as the launch count and
  the attention terms take it. The cpu backend's C kernels and npu's operators are not
  counted: the reference's factors stand for them.

The step's memory-bound time is the sum at `cluster.memory_efficiency` of
`cluster.memory_gbps`, on the same stream as the matmuls (no overlap). The host's time for
the launches is launches.py's.
"""

from __future__ import annotations

from birkhoff.parallel.planning.activations import (
    block_bytes,
    bytes_per_token,
    head_terms,
    stage_blocks,
)
from birkhoff.parallel.planning.inventory import LAST
from birkhoff.parallel.planning.layout import (
    DTYPE_BYTES,
    keeps_weight_casts,
    sparse_rows,
    tp_local,
    unit,
    whole_table,
)

ADAMW_BYTES, ADAMW_NO_DECAY_BYTES = 84, 76
MUON_BYTES = 72
CLIP_BYTES = ACCUMULATE_BYTES = 12
CAST_BYTES = 6  # one way: float32 to bf16 (read 4, write 2) or back
SUMMED_CAST_BYTES = 10  # a bf16 gradient added to a float32 sum in one pass
# bytes moved per byte saved, by the kernels that run the forward and backward and by the
# residual: several streams (mHC, hyper-connections) or plain x + F(x) (see above)
ACTIVATION_TRAFFIC = {
    "reference": {"streams": 12.7, "plain": 8.5},
    "triton": {"streams": 6.1, "plain": 3.9},
}


def activation_traffic(kernels: str, residual_mode: str) -> float:
    """The activation traffic factor of the kernel backend `kernels` (the reference's where
    that backend's is not counted) for a model whose residual is `residual_mode`."""
    by_residual = ACTIVATION_TRAFFIC.get(kernels, ACTIVATION_TRAFFIC["reference"])
    return by_residual["plain" if residual_mode == "plain" else "streams"]


def muon_iteration_bytes(rows: int, cols: int) -> float:
    """Bytes one Newton-Schulz iteration moves outside its matmuls, on one matrix."""
    n = min(rows, cols)
    return 12 * n * n


def muon_run_bytes(rows: int, cols: int) -> float:
    """Bytes a Newton-Schulz run (the batch of one shape) moves once, whatever its count."""
    n = min(rows, cols)
    return 36 * n * n


def rank_traffic(
    inv, layout, work, mine: list[int], keys: set[int], stages: list[list[int]],
    micro_batches: int, recompute: float, muon_shapes: list[tuple[float, int, int]],
) -> dict[str, float]:  # fmt: skip
    """Bytes per step by kind on a device of the pipeline rank running stages `mine` (layer
    keys `keys`), over all its micro-batches (`recompute`: the share of the forward run
    again; `muon_shapes`: the (matrices, rows, columns) this rank orthogonalises)."""
    cfg = inv.cfg
    held = [g for g in inv.groups if g.layer in keys]
    whole = [g for g in held if whole_table(g, layout)]
    sharded = [g for g in held if g not in whole]
    local = sum(tp_local(g, layout) for g in sharded) / layout.dp_shard
    tables = sum(tp_local(g, layout) for g in sharded if g.engram_table) / layout.dp_shard
    muon = sum(tp_local(g, layout) for g in sharded if g.muon) / layout.dp_shard
    muon = muon if layout.muon else 0.0
    lookups = layout.micro_batch * micro_batches * work.seq_len
    touched = sum(sparse_rows(g, cfg, lookups) for g in whole) * cfg.engram.embed_dim
    touched *= 0.0 if layout.engram_host else 1.0  # host-resident tables step on the host
    optimizer = ADAMW_BYTES * (local - tables - muon) + ADAMW_NO_DECAY_BYTES * (tables + touched)
    optimizer += MUON_BYTES * muon
    for count, rows, cols in muon_shapes:
        optimizer += count * 10 * muon_iteration_bytes(rows, cols) + muon_run_bytes(rows, cols)
    accumulated = micro_batches > 1 and layout.dp_shard > 1
    accumulated = accumulated and not layout.fsdp_reduce_every_micro_batch
    grads = sum(unit(g, layout) for g in sharded) if accumulated else local
    kept, later = keeps_weight_casts(layout, work), micro_batches - 1
    # with the casts kept, the routed experts' gradients are summed in their casts (not under
    # a zero-bubble pipeline, whose weight passes take each micro-batch's from autograd)
    summing = kept and layout.pp_schedule != "zero_bubble"
    summed = cast_weights([g for g in held if g.expert], layout) if summing else 0.0
    gradients = CLIP_BYTES * (grads + touched) + ACCUMULATE_BYTES * (grads - summed) * later
    gradients += SUMMED_CAST_BYTES * summed * later
    weights = cast_weights(held, layout)
    forward, backward = weights, weights
    if layout.dp_shard > 1 and DTYPE_BYTES[work.param_dtype] == 2:
        forward = weights / layout.dp_shard  # FSDP casts its shard before the gather
    forwards = 1 if kept else micro_batches
    casts = CAST_BYTES * (forward * forwards + backward * micro_batches - summed * later)
    casts = casts if work.mixed_precision else 0.0
    saved = _saved_per_token(inv, layout, work, mine, stages) * layout.micro_batch * work.seq_len
    factor = activation_traffic(work.kernels, cfg.residual.mode)
    activations = factor * saved * micro_batches * (1 + recompute)
    return {"optimizer": optimizer, "gradients": gradients, "casts": casts,
            "activations": activations}  # fmt: skip


def cast_weights(groups, layout) -> float:
    """Elements of the weights the matmuls cast to bf16 among `groups` (their FSDP units)."""
    return sum(unit(g, layout) for g in groups if g.muon or _head(g))


def _head(g) -> bool:
    return g.balanced and not g.engram_table and g.layer == LAST


def _saved_per_token(inv, layout, work, mine: list[int], stages: list[list[int]]) -> float:
    """What autograd saves per token on this rank without checkpointing (activations.py)."""
    cfg = inv.cfg
    act_bytes = 2 if work.mixed_precision else 4
    total = 0.0
    for stage in mine:
        last = stage == layout.num_stages - 1
        for layer in stage_blocks(cfg, stages[stage], last):
            total += block_bytes(
                inv, layer, work.seq_len, act_bytes, work.attention, layout.tp,
                layout.sequence_parallel, "all",
            )  # fmt: skip
        if last:
            total += bytes_per_token(head_terms(cfg, act_bytes), 1, False, "all")
    return total
