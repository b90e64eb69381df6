"""Engram tables kept whole on every rank (optim.engram_update=sparse): on the device or, with
parallel.engram_host, in host memory, and the data-parallel mean of their row-sparse
gradients. Such a table is outside FSDP and DDP (neither reduces sparse gradients on NCCL);
after backward every rank gathers the (row, gradient) pairs of all ranks, sums duplicate
rows and divides by the data-parallel size: the mean FSDP or DDP take for every other
parameter. The traffic follows the rows the step looked up, not the table's size."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from birkhoff.model.engram import Engram
from birkhoff.parallel.distributed import DistributedContext


def materialise(model: nn.Module, device: torch.device, host_tables: bool) -> None:
    """`to_empty` on `device`; with `host_tables` every Engram table goes to host memory
    instead (pinned where an accelerator copies from it), never through the device."""
    engrams = [m for m in model.modules() if isinstance(m, Engram)] if host_tables else []
    tables = [m.table for m in engrams]
    for module in engrams:
        module.table = None  # out of to_empty's reach
    model.to_empty(device=device)
    for module, table in zip(engrams, tables, strict=True):
        table.to_empty(device="cpu")
        if device.type not in ("cpu", "meta"):  # an accelerator copies from pinned pages
            table.weight.data = table.weight.data.pin_memory()
        module.table = table


def gather_rows(grad: torch.Tensor, group: dist.ProcessGroup, ranks: int) -> torch.Tensor:
    """The sum over `group` of a sparse (rows, ...) gradient, coalesced. Each rank sends its
    own rows coalesced (repeated n-grams once), padded to the longest rank's."""
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    count = torch.tensor([rows.numel()], device=rows.device)
    counts = count.new_empty(ranks)
    dist.all_gather_into_tensor(counts, count, group=group)
    sizes = counts.tolist()
    longest = max(sizes)
    padded_rows = rows.new_zeros(longest)
    padded_rows[: rows.numel()] = rows
    padded_values = values.new_zeros(longest, *values.shape[1:])
    padded_values[: rows.numel()] = values
    all_rows = rows.new_empty(ranks * longest)  # concatenated along dim 0 (gloo's form)
    all_values = values.new_empty(ranks * longest, *values.shape[1:])
    dist.all_gather_into_tensor(all_rows, padded_rows, group=group)
    dist.all_gather_into_tensor(all_values, padded_values, group=group)
    rows = torch.cat([r[:n] for r, n in zip(all_rows.split(longest), sizes, strict=True)])
    values = torch.cat([v[:n] for v, n in zip(all_values.split(longest), sizes, strict=True)])
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, grad.shape).coalesce()


class SparseGradientMean:
    """After-backward hook: every table's sparse gradient becomes its data-parallel mean."""

    def __init__(self, modules: list[nn.Module], ctx: DistributedContext) -> None:
        # The Engram modules, not their tables: materialisation may replace the parameters.
        self.modules, self.ctx = modules, ctx

    @torch.no_grad()
    def __call__(self, *_) -> None:
        group, ranks = self.ctx.group("dp"), self.ctx.dp_size
        for module in self.modules:
            table = module.table.weight
            if table.grad is not None:  # a host table's rows travel through the device
                gathered = gather_rows(table.grad.to(self.ctx.device), group, ranks)
                table.grad = (gathered / ranks).to(table.device)
