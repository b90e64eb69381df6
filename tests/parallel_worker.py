"""One rank of layout-equivalence runs (started by torchrun from test_parallel.py).

For each layout (one process group, a DeviceMesh per layout: a torchrun per layout would
spend most of its time starting), trains `steps` steps and saves what this rank knows: every
step's loss and gradient norm, the MoE router biases after the last step (and, in one
process or with Anticipatory Routing, the experts every router chose), and the full
(unsharded) gradients of the first and the last step, before clipping, of each parameter it
holds, by its name in the unwrapped model, and what the second step cost the rank (collective
bytes, tensors held, resident growth) and, for the layouts in PEAK, one more step its
allocator (layout_probe.py), to OUT_DIR/NAME/rankN.pt.
Usage: parallel_worker.py OUT_DIR STEPS JSON PEAK  (JSON: {name: [overrides...]}; PEAK: a JSON
list of names)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from birkhoff.data import open_data
from birkhoff.launch.recipe import load_recipe, recipe_to_dict
from birkhoff.model.moe import Router
from birkhoff.model.recompute import recomputing
from birkhoff.parallel import resolve_device
from birkhoff.parallel.activation_checkpoint import WRAPPED_PREFIX
from birkhoff.parallel.distributed import DistributedContext, build_mesh, env_rank
from birkhoff.train.entry import train_recipe_from_dict
from birkhoff.train.metrics import MetricLogger
from birkhoff.train.trainer import Trainer
from conftest import SMALL_OVERRIDES, compose_recipe
from layout_probe import measuring_allocated_peak, probe_step

ROUTING = "train.anticipatory.mode=always"


def full_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    grads = {}
    for part in trainer.model_parts:
        for name, param in part.named_parameters():
            grad = param.grad
            if grad is None:
                continue
            if isinstance(grad, DTensor):
                grad = grad.full_tensor()
            if grad.is_sparse:  # an Engram table under optim.engram_update=sparse
                grad = grad.to_dense()
            grads[name.replace(WRAPPED_PREFIX, "")] = grad.detach().float().cpu().clone()
    return grads


def routes_chosen(trainer: Trainer) -> dict[str, list[torch.Tensor]]:
    """Filled as it trains: per router (by name), the experts it chose in each training
    forward (not the recomputations of activation checkpointing), in order."""
    routes: dict[str, list[torch.Tensor]] = {}

    def keep(name: str):
        def hook(module, args, out) -> None:
            if module.training and not recomputing():
                routes.setdefault(name, []).append(out[1].detach().clone())

        return hook

    for part in trainer.model_parts:
        for name, module in part.named_modules():
            if isinstance(module, Router):
                module.register_forward_hook(keep(name.replace(WRAPPED_PREFIX, "")))
    return routes


def run_layout(out: Path, steps: int, overrides: list[str], measure_peak: bool) -> None:
    recipe, _ = load_recipe(compose_recipe(SMALL_OVERRIDES + overrides), env={})
    train_recipe = train_recipe_from_dict(recipe_to_dict(recipe))
    rank, local_rank, world = env_rank()
    device = resolve_device("cpu", local_rank)
    degrees = train_recipe.parallel.degrees(world)
    mesh = build_mesh(degrees, device.type) if world > 1 else None
    ctx = DistributedContext(rank, local_rank, world, mesh, degrees, device)
    trainer = Trainer(train_recipe, open_data(train_recipe.data), ctx, device, MetricLogger([]))
    grads = {}

    def keep_gradients(t: Trainer) -> None:  # of the first and the last step only
        if t.step + 1 in (1, steps):
            grads[t.step + 1] = full_gradients(t)

    trainer.after_backward.append(keep_gradients)
    # one process, and Anticipatory Routing's pipeline run (each router on one rank)
    pipelined = ROUTING in overrides and "parallel.pp=2" in overrides
    routes = routes_chosen(trainer) if world == 1 or pipelined else {}
    records = [trainer.train_step()]
    probe = probe_step(trainer)  # the second step measured for `birkhoff plan` (layout_probe.py)
    records.append(probe.pop("record"))
    biases = {}

    def last_steps() -> None:  # the rest, then what the routers learnt
        records.extend(trainer.train_step() for _ in range(steps - 2))
        for part in trainer.model_parts:
            for name, buffer in part.named_buffers():
                if name.endswith("router.bias"):
                    biases[name.replace(WRAPPED_PREFIX, "")] = buffer.clone()

    if measure_peak:  # and one step beyond those compared, its allocator's peak
        probe.update(measuring_allocated_peak(trainer, last_steps))
    else:
        last_steps()
    saved = {
        "losses": [r["loss"] for r in records],
        "grad_norms": [r["grad_norm"] for r in records],
        "router_biases": biases,
        "first_grads": grads[1],
        "grads": grads[steps],
        "probe": probe,
        "routes": routes,
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(saved, out / f"rank{rank}.pt")
    # As Trainer.fit does: left to the garbage collector, the loader's workers would cost
    # their 5 s join timeout each (trainer.py, fit).
    trainer.loader.close()


def main(out_dir: str, steps: int, layouts: dict[str, list[str]], peak: list[str]) -> None:
    world = env_rank()[2]
    if world > 1:
        dist.init_process_group("gloo")
    try:
        for name, overrides in layouts.items():
            run_layout(Path(out_dir) / name, steps, overrides, name in peak)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]))
