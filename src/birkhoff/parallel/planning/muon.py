"""Muon (optim=muon_v4) in the plan: what a rank orthogonalises, its Newton-Schulz runs and
their launches, and the memory an optimizer step holds, as train/muon.py and
parallel/muon_exchange.py run them: a matrix with an owner group (the ranks that shard it) is
orthogonalised by its owner (round-robin by size, largest first, per group), a bucket at a
time; the others (routed experts' stacks, replicated matrices, everything in one process)
where they lie, a bucket at a time; in a bucket, the matrices of one shape up to a transpose
take one batched run."""

from __future__ import annotations

from birkhoff.parallel.muon_exchange import BUCKET_BYTES, bucket_spans, shape_batches
from birkhoff.parallel.planning.communication import (
    muon_exchange_name,
    muon_key,
    muon_owner_group,
)
from birkhoff.parallel.planning.inventory import Inventory, TensorInfo
from birkhoff.parallel.planning.launches import LaunchCount, run_kind
from birkhoff.parallel.planning.layout import Layout


def muon_matrices(inv: Inventory, layout: Layout, keys: set[int]) -> list[tuple[float, int, int]]:
    """(matrices, rows, columns) of what Muon orthogonalises on a rank holding `keys`: the
    rank's own experts, and of the other matrices its owner's share."""
    if not layout.muon:
        return []
    key = muon_key("muon_matrices", layout, keys)
    return list(inv.remembered(key, lambda: tuple(_muon_matrices(inv, layout, keys))))


def _muon_matrices(inv: Inventory, layout: Layout, keys: set[int]) -> list:
    shapes = []
    for t in inv.params:
        if not t.matrices or t.layer not in keys:
            continue
        count, rows, cols = t.matrices
        ranks = layout.dp_shard if t.expert else muon_owner_group(layout, t)
        shapes.append((count / ranks, rows, cols))
    return shapes


def _in_order(inv: Inventory, keys: set[int] | None) -> list[TensorInfo]:
    """The Muon matrices of `keys` in the order the trainer takes them: by size, largest
    first, ties in the model's order."""
    muon = [t for t in inv.params if t.matrices and (keys is None or t.layer in keys)]
    return sorted(muon, key=lambda t: -t.numel)


def _local_count(layout: Layout, t: TensorInfo) -> float:
    """Matrices a rank orthogonalises itself for `t`: its experts (at least one), or all."""
    return max(1.0, t.matrices[0] / layout.dp_shard) if t.expert else t.matrices[0]


def _runs_of(matrices: list[tuple[float, int, int]], runs: dict[str, float], weight: float):
    """Adds the batched runs of one bucket's (count, rows, cols) to `runs`, each `weight`."""
    for batch in shape_batches([(rows, cols) for _, rows, cols in matrices]):
        runs[run_kind(round(sum(matrices[i][0] for i in batch)))] += weight


def newton_schulz_runs(
    inv: Inventory, layout: Layout, keys: set[int] | None = None
) -> dict[str, float]:
    """A rank's Newton-Schulz runs in one optimizer step, of one matrix and of several (an
    expert stack, or matrices of one shape batched), the mean over an owner group's ranks.
    `keys`: the layers of the rank's pipeline stages (default: every layer)."""
    runs = {"matrix": 0.0, "stack": 0.0}
    order = _in_order(inv, keys)
    local = [t for t in order if t.expert or muon_owner_group(layout, t) == 1]
    shapes = [(_local_count(layout, t), *t.matrices[1:]) for t in local]
    sizes = [4.0 * count * rows * cols for count, rows, cols in shapes]
    for span in bucket_spans(sizes, [0] * len(shapes), BUCKET_BYTES):
        _runs_of([shapes[i] for i in span], runs, 1.0)
    groups: dict[str, list[TensorInfo]] = {}
    for t in order:
        if not t.expert and (name := muon_exchange_name(layout, t)) is not None:
            groups.setdefault(name, []).append(t)
    for matrices in groups.values():
        size = muon_owner_group(layout, matrices[0])
        owners = [i % size for i in range(len(matrices))]
        spans = bucket_spans([4.0 * t.numel for t in matrices], owners, BUCKET_BYTES)
        for span in spans:
            by_owner: dict[int, list] = {}
            for i in span:
                by_owner.setdefault(owners[i], []).append(matrices[i].matrices)
            for mine in by_owner.values():
                _runs_of(mine, runs, 1 / size)
    return runs


def optimizer_launches(
    inv: Inventory,
    layout: Layout,
    count: LaunchCount,
    keys: set[int] | None = None,
    share: float = 1.0,
) -> float:
    """A rank's launches of one optimizer step: the counted one-process step's, the
    elementwise part for `share` of the layers (the rank's pipeline stages), its
    Newton-Schulz runs replaced by those the rank makes on its stages' layers (`keys`), at
    the launches of a run of their kind (counted on a probe: the counted step's own runs are
    of the narrowed model's shapes, which may batch what the model's keep apart)."""
    counted = count.orthogonalised
    if not layout.muon or not counted:
        return count.optimizer * share
    launches = (count.optimizer - sum(total for _, total in counted.values())) * share
    for kind, runs in newton_schulz_runs(inv, layout, keys).items():
        launches += runs * count.launches_per_run[kind]
    return launches


def newton_schulz_flops(shapes: list[tuple[float, int, int]]) -> float:
    """FLOPs of V4's 10 Newton-Schulz iterations on these matrices: per iteration, with n
    the shorter side and m the longer, the Gram matrix (2 n^2 m), its square (2 n^3) and the
    product with the iterate (2 n^2 m)."""
    total = 0.0
    for count, rows, cols in shapes:
        n, m = min(rows, cols), max(rows, cols)
        total += count * 10 * (4 * n * n * m + 2 * n**3)
    return total


def muon_step_bytes(inv: Inventory, layout: Layout, keys: set[int]) -> float:
    """What Muon's step holds beside the state, float32: four times a bucket (the Nesterov
    inputs, the batch, the iterate, the updates) of what the rank orthogonalises itself or,
    as an owner, assembles: its own share of each, at most BUCKET_BYTES or one larger
    matrix."""
    if not layout.muon:
        return 0.0
    key = (*muon_key("muon_step_bytes", layout, keys), BUCKET_BYTES)  # the bucket's size too
    return inv.remembered(key, lambda: _muon_step_bytes(inv, layout, keys))


def _muon_step_bytes(inv: Inventory, layout: Layout, keys: set[int]) -> float:
    local = owned = largest = 0.0
    for t in inv.params:
        if not t.matrices or t.layer not in keys:
            continue
        count, rows, cols = t.matrices
        group = 1 if t.expert else muon_owner_group(layout, t)
        matrix = 4.0 * (_local_count(layout, t) if group == 1 else count) * rows * cols
        largest = max(largest, matrix)
        if group == 1:
            local += matrix
        else:
            owned += matrix / group
    return 4 * max(min(local, max(BUCKET_BYTES, largest)), min(owned, max(BUCKET_BYTES, largest)))
