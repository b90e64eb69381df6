"""`birkhoff train [overrides] --dry-run [--rank N]`: one rank of a layout, in this process.

The recipe is validated for its world size (launch.nnodes x launch.nproc_per_node), a fake
process group stands in for the others, and the rank's share is built exactly as training
builds it (train/model_share.py: meta device, pipeline cut, tp / ep / Engram rows / FSDP)
without storage. It prints the rank's parameter shapes and what they and their training
state take, beside `birkhoff plan`'s estimate for the layout, and exits: a 1T-parameter
layout can be checked on a laptop. The data is not read (Engram's token compression is the
identity here; it does not change any shape)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from birkhoff.errors import require
from birkhoff.launch.plan_command import (
    attention_kind,
    cluster_kernels,
    cluster_values,
    recipe_layout,
    workload_of,
)
from birkhoff.launch.recipe import Recipe
from birkhoff.model.engram import Engram
from birkhoff.model.init import clean_name
from birkhoff.parallel.distributed import DistributedContext, build_mesh
from birkhoff.parallel.planning.cluster import Cluster, cluster_from
from birkhoff.parallel.planning.estimate import GIB, estimate
from birkhoff.parallel.planning.inventory import build_inventory
from birkhoff.train.model_share import ModelShare, build_share
from birkhoff.train.optim import optimizer_groups
from birkhoff.train.snapshot import local_part


def dry_run(recipe: Recipe, rank: int) -> str:
    """The report of rank `rank`'s share of the layout (see the module docstring)."""
    with rank_share(recipe, rank) as (share, ctx):
        world = ctx.world_size
        coordinates = {dim: ctx.local_rank_in(dim) for dim in ("pp", "dp_shard", "tp", "ep")}
        lines = [
            f"rank {rank} of {world}: " + ", ".join(f"{k} {v}" for k, v in coordinates.items())
        ]
        held = 0
        for part in share.parts:
            for name, param in part.named_parameters():
                local = local_part(param)
                held += local.numel()
                whole = "" if local.shape == param.shape else f" of {tuple(param.shape)}"
                lines.append(f"  {clean_name(name)}: {tuple(local.shape)}{whole}")
        state = state_bytes(recipe, share.parts)
    lines += ["", f"this rank holds {held:,} parameters:"]
    lines += [f"  {kind}: {size / GIB:.2f} GiB" for kind, size in state.items()]
    if recipe.optim.engram_update == "sparse":
        lines.append("  (the Engram tables' row-sparse gradients: at most the step's lookups)")
    if not recipe.parallel.fsdp_reduce_every_micro_batch:
        lines.append("  (grads: the rank's shards once reduce-scattered; accumulating over "
                     "micro-batches, FSDP holds them unsharded until the last, as the plan "
                     "counts)")  # fmt: skip
    lines += _planned(recipe, world)
    return "\n".join(lines)


def state_bytes(recipe: Recipe, parts: list[nn.Module]) -> dict[str, int]:
    """What a rank's parameters, gradients, optimizer state and module buffers take, by the
    optimizer's own groups (train/optim.py: Muon's and the Sinkhorn-balanced update's one
    buffer per element, AdamW's two, float32), Engram tables whole in host memory under
    parallel.engram_host counted as the host's."""
    state = dict.fromkeys(("params", "grads", "optimizer", "buffers", "host"), 0)
    for part in parts:
        tables = {id(m.table.weight) for m in part.modules() if isinstance(m, Engram)}
        host = tables if recipe.parallel.engram_host else set()
        sparse = tables if recipe.optim.engram_update == "sparse" else set()
        grouped = set()
        for group in optimizer_groups(part, recipe.optim):
            per_element = 4 if group.get("muon") or group.get("sinkhorn") else 8
            for param in group["params"]:
                grouped.add(id(param))
                local = local_part(param)
                size = local.numel() * local.element_size()
                on_host = id(param) in host
                state["host" if on_host else "params"] += size
                state["host" if on_host else "optimizer"] += local.numel() * per_element
                state["grads"] += 0 if id(param) in sparse else size
        for param in part.parameters():  # frozen ones: no gradient, no state
            if id(param) not in grouped:
                state["params"] += local_part(param).numel() * param.element_size()
        state["buffers"] += sum(local_part(b).numel() * b.element_size() for b in part.buffers())
    if not recipe.parallel.engram_host:
        del state["host"]
    return state


@contextmanager
def rank_share(recipe: Recipe, rank: int) -> Iterator[tuple[ModelShare, DistributedContext]]:
    """Rank `rank`'s share of the recipe's layout, built on the meta device as training builds
    it, with its context; the fake process group lives until the block ends."""
    world = (recipe.launch.nnodes or 1) * recipe.launch.nproc_per_node
    require(0 <= rank < world, "--rank", rank, f"must be in [0, {world}) for this layout")
    recipe.validate(world)
    degrees = recipe.parallel.degrees(world)
    with _fake_group(rank, world):
        mesh = build_mesh(degrees, "cpu") if world > 1 else None
        local_rank = rank % recipe.launch.nproc_per_node
        ctx = DistributedContext(rank, local_rank, world, mesh, degrees, torch.device("cpu"))
        micro_batches = recipe.train.grad_accum_steps(ctx.dp_size)
        yield build_share(recipe, ctx, None, None, 0, micro_batches), ctx


def _planned(recipe: Recipe, world: int) -> list[str]:
    """`birkhoff plan`'s estimate for the layout, where the recipe names a cluster."""
    values = cluster_values(recipe)
    if values["device_memory_gib"] is None and values["preset"] is None:
        return ["(set cluster.preset or the cluster.* figures for the whole plan)"]
    cluster: Cluster = cluster_from({**values, "devices": world})
    layout = recipe_layout(recipe, world)
    # as `birkhoff plan` takes it
    work = workload_of(recipe, attention_kind(recipe, cluster), cluster_kernels(recipe, cluster))
    planned = estimate(build_inventory(recipe.model), layout, work, cluster)
    memory = ", ".join(f"{k} {v:.2f}" for k, v in planned.memory_gib.items())
    verdict = "fits" if planned.fits else "does NOT fit"
    return [
        f"plan for the fullest stage (GiB): {memory}; {verdict} in "
        f"{cluster.device_memory_gib:g} GiB ({cluster.name})",
    ]


@contextmanager
def _fake_group(rank: int, world: int) -> Iterator[None]:
    """A process group of `world` ranks whose collectives do nothing (torch's fake backend)."""
    if world == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    os.environ.setdefault("MASTER_ADDR", "localhost")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
