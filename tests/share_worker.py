"""One rank of test_model_share.py (started by torchrun): per job, builds this rank's share of
the model as the trainer does (meta, cut, shard, materialise, optionally `train.init_from`)
and writes what it measured to OUT/NAME/rankN.json: the growth of the resident set's peak
while building, the allocator's peak while building it again, the bytes of tensors held
(parameters, buffers), and a digest of every parameter whole (gathered from the shards) by
name.
Usage: share_worker.py OUT JSON  (JSON: {name: [overrides...]})
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from birkhoff.launch.recipe import load_recipe, recipe_to_dict
from birkhoff.model.init import clean_name
from birkhoff.parallel.distributed import DistributedContext, build_mesh, env_rank
from birkhoff.parallel.memory import AllocatedPeak, held_bytes, resident_mib
from birkhoff.train.entry import train_recipe_from_dict
from birkhoff.train.model_share import build_share
from conftest import compose_recipe
from layout_probe import start_peak_measurement


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()


def build_and_measure(overrides: list[str]) -> dict:
    """Build the share of this rank (of one process outside torchrun) and measure it."""
    recipe = train_recipe_from_dict(recipe_to_dict(load_recipe(compose_recipe(overrides), {})[0]))
    rank, local_rank, world = env_rank()
    device = torch.device("cpu")
    degrees = recipe.parallel.degrees(world)
    mesh = build_mesh(degrees, "cpu") if world > 1 else None
    ctx = DistributedContext(rank, local_rank, world, mesh, degrees, device)
    if world > 1:
        dist.barrier()
    before = start_peak_measurement()
    share = build_share(recipe, ctx, device, None, 0, micro_batches=2)
    growth = resident_mib(peak=True) - before
    held = held_bytes(share.parts)
    digests = {}
    for part in share.parts:
        for name, param in part.named_parameters():
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            digests[clean_name(name)] = digest(whole)
    del share
    gc.collect()
    # built again under the allocator's measurement (the profiler that reads it on a CPU holds
    # memory of its own, which the resident set above would count)
    with AllocatedPeak(device) as allocated:
        allocated.start()
        build_share(recipe, ctx, device, None, 0, micro_batches=2)
    return {
        "peak_growth_mib": growth,
        "allocated_peak_mib": allocated.peak_bytes / 2**20,
        "held": held,
        "digests": digests,
    }


def main(out_dir: str, jobs: dict[str, list[str]]) -> None:
    dist.init_process_group("gloo")
    try:
        for name, overrides in jobs.items():
            result = build_and_measure(overrides)
            out = Path(out_dir) / name
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
            gc.collect()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
