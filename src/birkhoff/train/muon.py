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
the slice of the one computed on the full matrix, the same as one process's. Each has an owner
in the ranks that shard it (dp_shard, tp, or both: HSDP's replicas each have their own), which
alone assembles and orthogonalises it; two all-to-alls per bucket of matrices carry the shards
to the owners and the updates back (parallel/muon_exchange.py). Replicated matrices are computed
by every rank. Expert stacks sharded only by expert (ep, FSDP) are orthogonalised where they
are, with no exchange.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from birkhoff.parallel.muon_exchange import (
    BUCKET_BYTES,
    Owned,
    bucket_spans,
    buckets,
    exchange,
    owner_dims,
    shape_batches,
    shard_grid,
)
from birkhoff.train.adamw import AdamW, hidden_gradients

QUINTIC = (3.4445, -4.7750, 2.0315)
CUBIC = (2.0, -1.5, 0.5)
V4_SCHEDULE = ((QUINTIC, 8), (CUBIC, 2))


def hybrid_newton_schulz(
    matrices: torch.Tensor, schedule=V4_SCHEDULE, eps: float = 1e-7
) -> torch.Tensor:
    """(..., n, m) -> the same shape: each matrix's orthogonal polar factor, approximately
    (see the module docstring), in float32, all matrices of a stack in one batched run."""
    x = matrices.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    stack = x.reshape(-1, *x.shape[-2:])
    stack = stack / torch.linalg.matrix_norm(stack, keepdim=True).clamp_min(eps)
    eye = torch.eye(stack.shape[-2], dtype=stack.dtype, device=stack.device)
    for (a, b, c), iterations in schedule:
        # a X + (b A + c A^2) X as (a I + A (b I + c A)) X: three batched products and one
        # pass over the n x n A; written as it reads, five more passes, over X's n x m too
        a_eye, b_eye = a * eye, b * eye
        for _ in range(iterations):
            gram = torch.bmm(stack, stack.mT)
            poly = torch.baddbmm(a_eye, gram, torch.add(b_eye, gram, alpha=c))
            stack = torch.bmm(poly, stack)
    x = stack.view(x.shape)
    return x.mT if tall else x


class MuonV4(AdamW):
    """Muon for the parameter groups marked `muon` (lr, weight_decay, momentum, update_rms),
    AdamW (with its sparse-row update) for the others; one optimizer, one state dict.
    `bucket_bytes`: the most float32 bytes an owner assembles per exchange, or a rank
    orthogonalises at once of the matrices it computes itself."""

    def __init__(self, params, schedule=V4_SCHEDULE, bucket_bytes: float = BUCKET_BYTES,
                 **adamw) -> None:  # fmt: skip
        super().__init__(params, **adamw)
        self.schedule = schedule
        self.bucket_bytes = bucket_bytes
        self.orthogonalised = 0  # matrices this rank ran Newton-Schulz on (a work counter)
        # per group: the matrices computed where they lie, and per owner group its matrices
        self._placed: dict[int, tuple[list, dict[tuple[int, ...], list[Owned]]]] = {}

    @torch.no_grad()
    def step(self, closure=None):  # torch's signature
        groups = [g for g in self.param_groups if g.get("muon")]
        with hidden_gradients([p for g in groups for p in g["params"]]):  # AdamW's step skips them
            loss = super().step(closure)
        for group in groups:
            self._muon_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        """The matrices computed where they lie, then the sharded ones, a bucket at a time
        (parallel/muon_exchange.py): the transient memory is a bucket's, not the model's;
        in a bucket, matrices of one shape (up to a transpose) take one Newton-Schulz run."""
        rms = group["update_rms"]
        local, owned = self._placement(group)
        local = [p for p in local if p.grad is not None]
        sizes = [4.0 * local_numel(p) for p in local]
        for span in bucket_spans(sizes, [0] * len(local), self.bucket_bytes):
            params = [local[i] for i in span]
            inputs = [self._nesterov(p, group) for p in params]
            wholes = self.orthogonalise_all([_whole(n) for n in inputs], rms)
            for param, given, update in zip(params, inputs, wholes, strict=True):
                self._apply(param, _placed_like(update, given), group)
        for matrices in owned.values():  # the same order on every rank of the owner group
            ready = [m for m in matrices if m.param.grad is not None]
            for bucket in buckets(ready, self.bucket_bytes):
                inputs = [self._nesterov(m.param, group) for m in bucket]
                updates = exchange(bucket, inputs, lambda w: self.orthogonalise_all(w, rms))
                for matrix, update in zip(bucket, updates, strict=True):
                    self._apply(matrix.param, update, group)

    def _nesterov(self, param: torch.Tensor, group: dict) -> torch.Tensor:
        """mu M_t + G_t, with M_t = mu M_{t-1} + G_t kept in the state."""
        state = self.state[param]
        if "momentum_buffer" not in state:  # and a step count, which AdamW's loading expects
            state["step"] = torch.tensor(0.0)
            state["momentum_buffer"] = torch.zeros_like(param.grad)
        state["step"] += 1
        momentum, buffer = group["momentum"], state["momentum_buffer"]
        buffer.mul_(momentum).add_(param.grad)
        return param.grad.add(buffer, alpha=momentum)

    @staticmethod
    def _apply(param: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        lr = float(group["lr"])
        param.mul_(1 - lr * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-lr)

    def orthogonalise(self, matrices: torch.Tensor, rms: float) -> torch.Tensor:
        """O for a matrix, or for each matrix of a stack (the last two dimensions): hybrid
        Newton-Schulz scaled to RMS `rms`. `birkhoff plan --launches` counts its launches
        per call (parallel/planning/launches.py) to spread them over the owner ranks."""
        self.orthogonalised += matrices[..., 0, 0].numel()  # matrices this rank worked on
        rows, cols = matrices.shape[-2:]
        update = hybrid_newton_schulz(matrices, self.schedule)  # experts: each on its own
        return update.mul_(math.sqrt(max(rows, cols)) * rms)

    def orthogonalise_all(self, matrices: list[torch.Tensor], rms: float) -> list[torch.Tensor]:
        """O for each of `matrices` (matrices or stacks of them), those of one shape up to a
        transpose in one batched run (the wide orientation, as the run iterates): on an
        accelerator one run's launches instead of one per matrix."""
        updates: list[torch.Tensor | None] = [None] * len(matrices)
        for batch in shape_batches([tuple(m.shape[-2:]) for m in matrices]):
            if len(batch) == 1:
                updates[batch[0]] = self.orthogonalise(matrices[batch[0]], rms)
                continue
            wide = [_wide(matrices[i]) for i in batch]
            stacked = torch.cat([w.reshape(-1, *w.shape[-2:]) for w in wide])
            counts = [w[..., 0, 0].numel() for w in wide]
            for i, update in zip(batch, self.orthogonalise(stacked, rms).split(counts),
                                 strict=True):  # fmt: skip
                given = matrices[i]
                tall = given.shape[-2] > given.shape[-1]
                updates[i] = (update.mT if tall else update).reshape(given.shape)
        return updates  # type: ignore[return-value]

    def _placement(self, group: dict) -> tuple[list, dict[tuple[int, ...], list[Owned]]]:
        """The group's matrices computed where they lie, and per owner group (by its global
        ranks) its matrices with their owners: round-robin in order of size, largest first
        (V4's hybrid ZeRO for Muon), the same on every rank."""
        if id(group) not in self._placed:
            local, shared = [], {}
            for param in sorted(group["params"], key=lambda p: -p.numel()):  # stable
                if not _owned(param):
                    local.append(param)
                    continue
                grid = shard_grid(param)
                ranks = tuple(dist.get_process_group_ranks(grid.group))
                matrices = shared.setdefault(ranks, [])
                matrices.append(Owned(param, grid, len(matrices) % grid.size))
            self._placed[id(group)] = (local, shared)
        return self._placed[id(group)]


def local_numel(param: torch.Tensor) -> int:
    """Elements of the matrix a rank orthogonalises itself for `param`: its own experts'
    stack, or the whole matrix."""
    if isinstance(param, DTensor) and _whole_experts(param):
        return param.to_local().numel()
    return param.numel()


def _whole(nesterov: torch.Tensor) -> torch.Tensor:
    """What a rank orthogonalises for a matrix no owner assembles: a whole one, its own
    experts (an expert stack sharded only by expert), or a replicated one in full."""
    if not isinstance(nesterov, DTensor):
        return nesterov
    return nesterov.to_local() if _whole_experts(nesterov) else nesterov.full_tensor()


def _placed_like(update: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
    """The update as `given` is held: a plain tensor, a DTensor of its own experts, or this
    rank's slice of a replicated one."""
    if not isinstance(given, DTensor):
        return update
    mesh, placements = given.device_mesh, given.placements
    if _whole_experts(given):
        return DTensor.from_local(update, mesh, placements, run_check=False,
                                  shape=given.shape, stride=given.stride())  # fmt: skip
    return distribute_tensor(update, mesh, placements, src_data_rank=None)


def _wide(matrices: torch.Tensor) -> torch.Tensor:
    """A matrix (or stack) with no more rows than columns: transposed if tall (a view)."""
    return matrices.mT if matrices.shape[-2] > matrices.shape[-1] else matrices


def _owned(param: torch.Tensor) -> bool:
    """Assembled on an owner: a DTensor that a mesh dimension of more than one rank shards,
    other than an expert stack sharded only by expert."""
    if not isinstance(param, DTensor) or _whole_experts(param):
        return False
    return bool(owner_dims(param))


def _whole_experts(tensor: DTensor) -> bool:
    """An expert stack (E, rows, cols) sharded only along experts: each rank holds whole
    experts, which Muon orthogonalises one by one. ep inside FSDP gives a strided shard of
    dim 0 (`_StridedShard`, which is no `Shard`): whole experts too."""
    return tensor.dim() == 3 and all(
        p.is_replicate() or getattr(p, "dim", None) == 0 for p in tensor.placements
    )
