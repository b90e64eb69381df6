"""Muon as DeepSeek-V4 trains its matrices (report §2.4), with AdamW for everything else.

For a matrix W with gradient G (routed experts: each expert's matrix on its own):
    M_t = mu M_{t-1} + G_t                      (momentum 0.95)
    O'  = HybridNS(mu M_t + G_t)                (Nesterov)
    O   = O' sqrt(max(n, m)) gamma              (update RMS gamma = 0.18)
    W  <- W (1 - lr wd) - lr O                  (decoupled weight decay 0.1)
HybridNS: X = M / ||M||_F (the wide orientation), 8 quintic Newton-Schulz iterations with
(3.4445, -4.7750, 2.0315), which push every singular value into roughly [0.7, 1.2] fast,
then 2 with (2, -1.5, 0.5), which pull them to 1: X <- a X + (b A + c A^2) X, A = X X^T.
Float32 throughout (torch.optim.Muon iterates in bfloat16).

Against torch.optim.Muon (torch 2.13): its momentum is an EMA (buf.lerp_(G, 1 - mu), the
Nesterov input G.lerp(buf, mu)): (1 - mu) times V4's, which the Frobenius normalisation
removes; it runs one coefficient set for all iterations (no hybrid), 2-D matrices only, and
scales by 0.2 sqrt(max(n, m)) with adjust_lr_fn="match_rms_adamw" (V4: 0.18).

Sharded matrices (FSDP, tp: DTensors) are orthogonalised whole: the update a rank applies is
the slice of the one computed on the full matrix, the same as one process's. Each gathered
matrix has an owner rank (round-robin by size, as V4's hybrid ZeRO) that alone runs
Newton-Schulz and scatters the result, so the work is spread over the ranks: when the matrix
is sharded along a mesh dimension of more than one rank (FSDP, or tp alone; under HSDP the
replicas each have their owner, so the work is spread over dp_shard) it is assembled on the
owner alone (one gather of the shards: a rank receives only the matrices it owns); sharded
along both dp_shard and tp (fsdp x tp, a matrix tp splits) it is gathered whole on every rank,
and the owner along dp_shard and its tp peers compute it, each keeping its tp slice. A
column-parallel matrix under fsdp x tp, which FSDP shards with a strided placement (its tp
rows split again over dp_shard), goes the same way: the owner's scatter along dp_shard with
that placement gives each dp rank its rows of every tp slice, of which it keeps its own tp
slice's (DTensor scatters a strided shard only when it splits evenly: an uneven one is
computed by every rank).
Expert stacks sharded only by expert (ep, FSDP) are orthogonalised where they are, with no
gather.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from birkhoff.train.adamw import AdamW, hidden_gradients

QUINTIC = (3.4445, -4.7750, 2.0315)
CUBIC = (2.0, -1.5, 0.5)
V4_SCHEDULE = ((QUINTIC, 8), (CUBIC, 2))


def hybrid_newton_schulz(
    matrices: torch.Tensor, schedule=V4_SCHEDULE, eps: float = 1e-7
) -> torch.Tensor:
    """(..., n, m) -> the same shape: each matrix's orthogonal polar factor, approximately
    (see the module docstring), in float32."""
    x = matrices.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp_min(eps)
    for (a, b, c), iterations in schedule:
        for _ in range(iterations):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class MuonV4(AdamW):
    """Muon for the parameter groups marked `muon` (lr, weight_decay, momentum, update_rms),
    AdamW (with its sparse-row update) for the others; one optimizer, one state dict."""

    def __init__(self, params, schedule=V4_SCHEDULE, **adamw) -> None:  # torch's signature
        super().__init__(params, **adamw)
        self.schedule = schedule
        self.orthogonalised = 0  # matrices this rank ran Newton-Schulz on (a work counter)
        self._owners_of_group: dict[int, dict[int, int]] = {}  # group -> param -> owner

    @torch.no_grad()
    def step(self, closure=None):  # torch's signature
        groups = [g for g in self.param_groups if g.get("muon")]
        with hidden_gradients([p for g in groups for p in g["params"]]):  # AdamW's step skips them
            loss = super().step(closure)
        for group in groups:
            self._muon_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        """One matrix (or one expert stack) at a time: a sharded one is whole on the rank only
        while its own update is computed, so the transient memory is the largest matrix's,
        not the model's."""
        lr = float(group["lr"])
        owners = self._owners(group)
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if "momentum_buffer" not in state:  # and a step count, which AdamW's loading expects
                state["step"] = torch.tensor(0.0)
                state["momentum_buffer"] = torch.zeros_like(param.grad)
            state["step"] += 1
            momentum, buffer = group["momentum"], state["momentum_buffer"]
            buffer.mul_(momentum).add_(param.grad)  # M_t = mu M_{t-1} + G_t
            nesterov = param.grad.add(buffer, alpha=momentum)  # mu M_t + G_t
            update = self._update(nesterov, owners.get(id(param)), group["update_rms"])
            param.mul_(1 - lr * group["weight_decay"])
            param.add_(update.to(param.dtype), alpha=-lr)

    def _update(self, nesterov: torch.Tensor, owner: int | None, rms: float) -> torch.Tensor:
        """O for this rank's part of the matrix: computed locally for whole matrices and for
        expert stacks sharded only by expert; else the matrix is gathered, orthogonalised by
        its owner (and its peers along the other sharding dimensions) and scattered back."""
        if not isinstance(nesterov, DTensor):
            return self.orthogonalise(nesterov, rms)
        mesh, placements = nesterov.device_mesh, nesterov.placements
        if _whole_experts(nesterov):  # each expert on its own: nothing to gather
            local = self.orthogonalise(nesterov.to_local(), rms)
            return DTensor.from_local(local, mesh, placements, run_check=False,
                                      shape=nesterov.shape, stride=nesterov.stride())  # fmt: skip
        if owner is None:  # every rank computes it and keeps its slice
            update = self.orthogonalise(nesterov.full_tensor(), rms)
            return distribute_tensor(update, mesh, placements, src_data_rank=None)
        dim = _owner_dim(nesterov)
        sharded = [d for d, size in enumerate(mesh.shape) if size > 1 and _sharded(placements[d])]
        # sharded along `dim` alone: assembled on its owner alone; along dp_shard and tp both,
        # whole on every rank (the owner's tp peers compute it alongside)
        alone = sharded == [dim]
        whole = _gathered_on(nesterov, dim, owner) if alone else nesterov.full_tensor()
        if mesh.get_local_rank(dim) == owner:
            update = self.orthogonalise(whole, rms)
        else:  # the owner's arrives
            update = torch.empty(nesterov.shape, dtype=torch.float32, device=nesterov.device)
        mine = distribute_tensor(update, _line(mesh, dim), [placements[dim]], src_data_rank=owner)
        mine = mine.to_local()
        for other, size in enumerate(mesh.shape):  # whole along these: the rank's slice here
            if other != dim and size > 1 and placements[other].is_shard():
                sliced = distribute_tensor(mine, _line(mesh, other), [placements[other]],
                                           src_data_rank=None)  # fmt: skip
                mine = sliced.to_local()
        return DTensor.from_local(mine, mesh, placements, run_check=False,
                                  shape=nesterov.shape, stride=nesterov.stride())  # fmt: skip

    def orthogonalise(self, matrices: torch.Tensor, rms: float) -> torch.Tensor:
        """O for a matrix, or for each matrix of a stack (the last two dimensions): hybrid
        Newton-Schulz scaled to RMS `rms`. `birkhoff plan --launches` counts its launches
        per call (parallel/planning/launches.py) to spread them over the owner ranks."""
        self.orthogonalised += matrices[..., 0, 0].numel()  # matrices this rank worked on
        rows, cols = matrices.shape[-2:]
        update = hybrid_newton_schulz(matrices, self.schedule)  # experts: each on its own
        return update.mul_(math.sqrt(max(rows, cols)) * rms)

    def _owners(self, group: dict) -> dict[int, int]:
        """The rank (in its 1-D mesh) that orthogonalises each gathered matrix: round-robin
        in order of size, largest first (V4's hybrid ZeRO for Muon), the same on every rank."""
        if id(group) not in self._owners_of_group:
            gathered = sorted((p for p in group["params"] if _owned(p)), key=lambda p: -p.numel())
            self._owners_of_group[id(group)] = {
                id(p): i % p.device_mesh.size(_owner_dim(p)) for i, p in enumerate(gathered)
            }
        return self._owners_of_group[id(group)]


def _owner_dim(param: DTensor) -> int | None:
    """The mesh dimension an owner is chosen along: the first of more than one rank that
    shards the matrix (FSDP's dp_shard, or tp alone). Along the others the owner's peers
    compute the same update: HSDP's replicas, and under fsdp x tp the tp ranks (each then
    takes its tp slice locally); FSDP's strided shard of a tp-colwise matrix counts as a
    shard where it splits evenly. None where a placement is none of those (a partial one) or
    a strided shard is uneven: every rank computes it."""
    mesh = param.device_mesh
    dims = [d for d, size in enumerate(mesh.shape) if size > 1]
    sharded = [d for d in dims if _sharded(param.placements[d])]
    plain = all(_sharded(param.placements[d]) or param.placements[d].is_replicate()
                for d in dims)  # fmt: skip
    named = mesh.ndim == 1 or mesh.mesh_dim_names is not None
    return sharded[0] if sharded and plain and named and _scatterable(param) else None


def _scatterable(param: DTensor) -> bool:
    """DTensor scatters a strided shard only when it splits evenly (uneven ones it splits
    locally alone): an uneven one is computed by every rank."""
    mesh = param.device_mesh
    return all(
        param.shape[p.dim] % (p.split_factor * mesh.size(d)) == 0
        for d, p in enumerate(param.placements)
        if isinstance(p, _StridedShard)
    )


def _sharded(placement) -> bool:
    """A plain shard, or FSDP's strided one (`_StridedShard`, which is no `Shard`)."""
    return placement.is_shard() or isinstance(placement, _StridedShard)


def _gathered_on(tensor: DTensor, dim: int, owner: int) -> torch.Tensor | None:
    """The whole of `tensor`, sharded along mesh dimension `dim` only, on that dimension's
    rank `owner` (None on the others): one gather of the local shards, padded to the longest,
    each put back at the rows DTensor's own split gives that rank (a plain or a strided
    shard alike)."""
    line = _line(tensor.device_mesh, dim)
    placement, size = tensor.placements[dim], line.size()
    local = tensor.to_local()
    shape = [1] * tensor.dim()
    shape[placement.dim] = tensor.shape[placement.dim]
    index = torch.arange(tensor.shape[placement.dim], device=local.device).reshape(shape)
    pieces, _ = placement._split_tensor(index, size, with_padding=False, contiguous=True)
    rows = [piece.reshape(-1) for piece in pieces]  # of the sharded dimension, rank by rank
    longest = max(r.numel() for r in rows)
    padded = local.new_zeros(*[longest if d == placement.dim else n
                               for d, n in enumerate(local.shape)])  # fmt: skip
    padded.narrow(placement.dim, 0, local.shape[placement.dim]).copy_(local)
    mine = line.get_local_rank() == owner
    received = [torch.empty_like(padded) for _ in range(size)] if mine else None
    dist.gather(padded, received, group=line.get_group(), group_dst=owner)
    if not mine:
        return None
    whole = local.new_empty(tensor.shape)
    for at, piece in zip(rows, received, strict=True):
        whole.index_copy_(placement.dim, at, piece.narrow(placement.dim, 0, at.numel()))
    return whole


def _line(mesh, dim: int):
    """The 1-D mesh of this rank's peers along `dim`."""
    return mesh[mesh.mesh_dim_names[dim]] if mesh.ndim > 1 else mesh


def _owned(param: torch.Tensor) -> bool:
    """Gathered from shards along one mesh dimension: one owner computes it (a replicated
    matrix, or one sharded over several dimensions, is computed by every rank)."""
    if not isinstance(param, DTensor) or _whole_experts(param):
        return False
    return _owner_dim(param) is not None


def _whole_experts(tensor: DTensor) -> bool:
    """An expert stack (E, rows, cols) sharded only along experts: each rank holds whole
    experts, which Muon orthogonalises one by one. ep inside FSDP gives a strided shard of
    dim 0 (`_StridedShard`, which is no `Shard`): whole experts too."""
    return tensor.dim() == 3 and all(
        p.is_replicate() or getattr(p, "dim", None) == 0 for p in tensor.placements
    )
