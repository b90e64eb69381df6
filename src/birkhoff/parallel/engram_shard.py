"""Engram tables sharded by rows over the `dp_shard` ranks, so tables larger than one device
fit. Every rank hashes its own tokens; the row ids go to the ranks owning them (index
all-to-all), the owners gather their rows and send them back (row all-to-all, which carries
the gradients home in backward). The table is a DTensor sharded on rows, so the optimizer,
gradient clipping and checkpoints see one logical table.

Gradients: an owner's rows collect the contributions of every rank's tokens (a sum), so the
backward of the lookup divides each contribution by the data-parallel size and, with HSDP
replicas, sums it over dp_replicate: the same mean FSDP takes for every other parameter.
Doing it per contribution (not on the accumulated gradient) keeps gradient accumulation
over micro-batches exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from birkhoff.model.engram import Engram


class RowShardedEmbedding(nn.Module):
    """Stands in for an Engram layer's nn.Embedding: forward(rows) -> row vectors."""

    def __init__(
        self, table: nn.Embedding, mesh: DeviceMesh, dp_size: int, replicate: DeviceMesh | None
    ) -> None:
        super().__init__()
        self.mesh, self.dp_size, self.replicate = mesh, dp_size, replicate
        self.num_rows = table.num_embeddings
        self.rows_per_rank = -(-self.num_rows // mesh.size())  # torch.chunk's split
        self.weight = nn.Parameter(distribute_tensor(table.weight.detach(), mesh, [Shard(0)]))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (...) global row ids -> (..., embed_dim)."""
        group, ranks = self.mesh.get_group(), self.mesh.size()
        flat = rows.flatten()
        owner = flat // self.rows_per_rank
        order = torch.argsort(owner, stable=True)
        sent_counts = torch.bincount(owner, minlength=ranks)
        received_counts = torch.empty_like(sent_counts)
        dist.all_to_all_single(received_counts, sent_counts, group=group)
        sent, received = sent_counts.tolist(), received_counts.tolist()
        wanted = torch.empty(sum(received), dtype=flat.dtype, device=flat.device)
        dist.all_to_all_single(wanted, flat[order], received, sent, group=group)
        local = _DataParallelMean.apply(self.weight.to_local(), self.dp_size, self.replicate)
        offset = self.mesh.get_local_rank() * self.rows_per_rank
        found = F.embedding(wanted - offset, local)
        returned = all_to_all_single_autograd(found, sent, received, group)
        vectors = torch.empty_like(returned).index_copy(0, order, returned)
        return vectors.view(*rows.shape, local.shape[-1])


class _DataParallelMean(torch.autograd.Function):
    """Identity forward; backward turns this rank's summed row gradients into its share of
    the data-parallel mean (divide by dp, sum over HSDP replicas)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, dp_size: int, replicate: DeviceMesh | None):
        ctx.dp_size, ctx.replicate = dp_size, replicate
        return local.view_as(local)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad / ctx.dp_size
        if ctx.replicate is not None:
            dist.all_reduce(grad, group=ctx.replicate.get_group())
        return grad, None, None


def shard_engram_tables(model: nn.Module, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Replace every Engram table in `model` by its row-sharded version over mesh["dp_shard"];
    returns the new table parameters (FSDP must leave them alone)."""
    shard_mesh = mesh["dp_shard"]
    replicate = mesh["dp_replicate"] if mesh["dp_replicate"].size() > 1 else None
    dp_size = shard_mesh.size() * (replicate.size() if replicate is not None else 1)
    tables = []
    for module in model.modules():
        if isinstance(module, Engram):
            module.table = RowShardedEmbedding(module.table, shard_mesh, dp_size, replicate)
            tables.append(module.table.weight)
    return tables
