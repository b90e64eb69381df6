"""Muon's sharded matrices assembled on their owners and their updates sent back, in buckets.

A matrix sharded along mesh dimensions of more than one rank (FSDP's dp_shard, tp, or both)
has an owner group: the ranks of those dimensions (HSDP's replicas each have their own group
and compute the same updates). Every matrix of the group has an owner in it, round-robin by
size, largest first (V4's hybrid ZeRO for Muon). A bucket of the group's matrices costs two
all-to-alls: every rank sends each owner its shards of the owner's matrices, the owners
orthogonalise them whole, and every rank receives its slices of the updates. A bucket holds
matrices in owner order until an owner would assemble more than BUCKET_BYTES (float32), so a
step costs 2 collectives per bucket, not 2 per matrix, and its transient memory is bounded:
at most about 4 buckets' worth on an owner (its received shards, the whole matrices, the
updates, the slices going back), beside the Nesterov inputs.

Where a rank's shard lies is DTensor's own definition (distribute_tensor's): each mesh
dimension's placement splits the tensor left by the earlier ones, plain or strided
(`_StridedShard._split_tensor`); uneven plain shards included, strided ones only where they
split evenly (owner_dims). A shard is a grid: per tensor
dimension, the global indices it holds, which depend only on the rank's coordinates along
the mesh dimensions that split that tensor dimension; kept per matrix, they take as many
indices as the matrix has rows and columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

BUCKET_BYTES = 256 * 2**20  # the most float32 an owner assembles per exchange


def sharded(placement) -> bool:
    """A plain shard, or FSDP's strided one (`_StridedShard`, which is no `Shard`)."""
    return placement.is_shard() or isinstance(placement, _StridedShard)


def owner_dims(param: DTensor) -> list[int]:
    """The mesh dimensions of more than one rank that shard `param`: its owner group is
    their ranks. Empty where none does, where another dimension holds a partial value,
    where a multi-dimensional mesh has no names, or where a strided shard (FSDP's of a
    column-parallel matrix) does not split evenly: FSDP2 cuts those rows per tp rank, where
    DTensor's split (which shard_grid follows) cuts them otherwise. Every rank computes it."""
    mesh = param.device_mesh
    wide = [d for d in range(mesh.ndim) if mesh.size(d) > 1]
    dims = [d for d in wide if sharded(param.placements[d])]
    plain = all(sharded(param.placements[d]) or param.placements[d].is_replicate() for d in wide)
    named = mesh.ndim == 1 or mesh.mesh_dim_names is not None
    even = all(
        param.shape[p.dim] % (p.split_factor * mesh.size(d)) == 0
        for d, p in enumerate(param.placements)
        if isinstance(p, _StridedShard)
    )
    return dims if plain and named and even else []


def owner_group_size(param: DTensor) -> int:
    """Ranks among which one owner orthogonalises `param` (1: every rank computes it)."""
    return math.prod(param.device_mesh.size(d) for d in owner_dims(param))


@dataclass
class ShardGrid:
    """Where each rank of an owner group holds its shard of one matrix."""

    group: dist.ProcessGroup
    size: int  # ranks in the group
    rank: int  # this rank's index in it
    # per rank of the group, per tensor dimension: the global indices it holds
    held: list[list[torch.Tensor]]

    def numel(self, rank: int) -> int:
        return math.prod(len(i) for i in self.held[rank])

    def _grid(self, rank: int) -> tuple[torch.Tensor, ...]:
        held = self.held[rank]
        return tuple(i.view([-1 if d == t else 1 for d in range(len(held))])
                     for t, i in enumerate(held))  # fmt: skip

    def put(self, whole: torch.Tensor, rank: int, flat: torch.Tensor) -> None:
        """Write rank `rank`'s shard (flattened) into the whole matrix."""
        whole[self._grid(rank)] = flat.view([len(i) for i in self.held[rank]])

    def take(self, whole: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s shard of the whole matrix, flattened."""
        return whole[self._grid(rank)].reshape(-1)


def shard_grid(param: DTensor) -> ShardGrid:
    """The owner group of `param` (owner_dims non-empty) and where its ranks' shards lie."""
    mesh, placements, dims = param.device_mesh, param.placements, owner_dims(param)
    line = _flattened(mesh, dims)
    sizes = [mesh.size(d) for d in dims]
    coordinate = mesh.get_coordinate()
    rank = line.get_local_rank()
    if rank != _ravel([coordinate[d] for d in dims], sizes):  # the flattening's rank order
        raise RuntimeError(f"Muon: the flattened mesh {line} does not order ranks row-major")
    # per tensor dimension: the group's mesh dimensions (positions in `sizes`) that split it,
    # and per combination of their coordinates (row-major) the global indices held there
    splits = []
    for t, length in enumerate(param.shape):
        positions = [i for i, d in enumerate(dims) if placements[d].dim == t]
        pieces = [torch.arange(length, device=param.device_mesh.device_type)]
        for i in positions:  # each split in mesh order applies to what the earlier ones left
            placement, count = placements[dims[i]], sizes[i]
            shape = [1] * param.dim()
            split = []
            for held in pieces:
                shape[t] = len(held)
                parts, _ = placement._split_tensor(held.view(shape), count, with_padding=False,
                                                   contiguous=True)  # fmt: skip
                split += [part.reshape(-1) for part in parts]
            pieces = split
        splits.append((positions, pieces))
    held = []
    for r in range(line.size()):
        coords = _unravel(r, sizes)
        held.append([pieces[_ravel([coords[p] for p in positions], [sizes[p] for p in positions])]
                     for positions, pieces in splits])  # fmt: skip
    return ShardGrid(line.get_group(), line.size(), rank, held)


def _flattened(mesh: DeviceMesh, dims: list[int]) -> DeviceMesh:
    """The 1-D mesh of this rank's peers along `dims`. Several dimensions are flattened
    under their joined names; the world mesh creates dp_shard_tp when it is built
    (parallel/distributed.py), since creating a group here would need every rank."""
    if mesh.ndim == 1:
        return mesh
    names = [mesh.mesh_dim_names[d] for d in dims]
    if len(names) == 1:
        return mesh[names[0]]
    return mesh[tuple(names)]._flatten("_".join(names))


def _ravel(coords: list[int], sizes: list[int]) -> int:
    index = 0
    for coord, size in zip(coords, sizes, strict=True):
        index = index * size + coord
    return index


def _unravel(index: int, sizes: list[int]) -> list[int]:
    coords = []
    for size in reversed(sizes):
        coords.append(index % size)
        index //= size
    return coords[::-1]


@dataclass
class Owned:
    """A matrix of an owner group: its parameter, where its shards lie, its owner's index."""

    param: DTensor
    grid: ShardGrid
    owner: int


def bucket_spans(sizes: list[float], owners: list[int], bucket_bytes: float) -> list[range]:
    """Consecutive items (in owner order) while no owner holds more than `bucket_bytes`;
    an item larger than that is a bucket of its own. The trainer's buckets and the plan's."""
    spans, start, load = [], 0, {}
    for i, (size, owner) in enumerate(zip(sizes, owners, strict=True)):
        if i > start and load.get(owner, 0.0) + size > bucket_bytes:
            spans.append(range(start, i))
            start, load = i, {}
        load[owner] = load.get(owner, 0.0) + size
    if start < len(sizes):
        spans.append(range(start, len(sizes)))
    return spans


def shape_batches(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of matrices orthogonalised in one Newton-Schulz run: those of one shape up to
    a transpose ((rows, cols) of each, or of each matrix of a stack), in order of first
    appearance. The trainer's batches and the plan's."""
    batches: dict[tuple[int, int], list[int]] = {}
    for i, (rows, cols) in enumerate(shapes):
        batches.setdefault((min(rows, cols), max(rows, cols)), []).append(i)
    return list(batches.values())


def buckets(matrices: list[Owned], bucket_bytes: float) -> Iterator[list[Owned]]:
    """Consecutive matrices (in owner order) while no owner assembles more than
    `bucket_bytes` of float32; a matrix larger than that is a bucket of its own."""
    sizes = [4.0 * m.param.numel() for m in matrices]
    for span in bucket_spans(sizes, [m.owner for m in matrices], bucket_bytes):
        yield [matrices[i] for i in span]


def exchange(
    bucket: list[Owned],
    inputs: list[DTensor],
    orthogonalise: Callable[[list[torch.Tensor]], list[torch.Tensor]],
) -> list[DTensor]:
    """Each matrix's update as this rank's DTensor shard: its shards (of `inputs`, one per
    matrix of the bucket) all-to-all'd to the owners, each owner's whole matrices
    orthogonalised (all in one call), the slices all-to-all'd back."""
    grid = bucket[0].grid
    group, ranks, me = grid.group, grid.size, grid.rank
    by_owner: list[list[int]] = [[] for _ in range(ranks)]
    for i, matrix in enumerate(bucket):
        by_owner[matrix.owner].append(i)
    mine = by_owner[me]
    device = inputs[0].device
    # to each owner, in order: this rank's shard of every matrix it owns
    sent = [inputs[i].to_local().float().reshape(-1) for r in range(ranks) for i in by_owner[r]]
    sent_splits = [sum(bucket[i].grid.numel(me) for i in by_owner[r]) for r in range(ranks)]
    got_splits = [sum(bucket[i].grid.numel(r) for i in mine) for r in range(ranks)]
    received = _all_to_all(sent, sent_splits, got_splits, group, device)
    wholes = _assembled([bucket[i] for i in mine], received, got_splits, device)
    del received
    wholes = orthogonalise(wholes)  # the whole matrices give way to their updates
    back = [bucket[i].grid.take(wholes[k], r) for r in range(ranks) for k, i in enumerate(mine)]
    del wholes
    returned = _all_to_all(back, got_splits, sent_splits, group, device)
    result: list[DTensor | None] = [None] * len(bucket)
    for r, piece in enumerate(returned.split(sent_splits)):
        sizes = [bucket[i].grid.numel(me) for i in by_owner[r]]
        for i, flat in zip(by_owner[r], piece.split(sizes), strict=True):
            given = inputs[i]
            local = flat.view(given.to_local().shape)
            result[i] = DTensor.from_local(local, given.device_mesh, given.placements,
                                           run_check=False, shape=given.shape,
                                           stride=given.stride())  # fmt: skip
    return result  # type: ignore[return-value]


def _assembled(owned: list[Owned], received: torch.Tensor, splits: list[int], device):
    """The whole matrices `owned`, from every rank's shards of them (`received`, by rank)."""
    wholes = [torch.empty(m.param.shape, dtype=torch.float32, device=device) for m in owned]
    for r, piece in enumerate(received.split(splits)):
        sizes = [m.grid.numel(r) for m in owned]
        for matrix, whole, flat in zip(owned, wholes, piece.split(sizes), strict=True):
            matrix.grid.put(whole, r, flat)
    return wholes


def _all_to_all(pieces: list, sent_splits, got_splits, group, device) -> torch.Tensor:
    """The pieces (emptied: the concatenation replaces them) to their ranks."""
    sent = torch.cat(pieces) if pieces else torch.empty(0, device=device)
    pieces.clear()
    got = torch.empty(sum(got_splits), dtype=torch.float32, device=device)
    dist.all_to_all_single(got, sent, got_splits, sent_splits, group=group)
    return got
