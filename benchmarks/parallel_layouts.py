"""Throughput and memory per rank of parallel layouts, relative to 1 rank in the same run.

Every layout trains the `tiny` recipe (mHC + MoE + Engram) on the shipped corpus through the
real Trainer, started by torchrun on gloo (CPU) or nccl/hccl (accelerators). Per layout it
reports tokens/s (global batch / step time of the fastest timed step: a shared machine's noise
only ever adds time), every tensor a rank holds (its shards of parameters, gradients and
AdamW moments, and its buffers; each storage once), the activations autograd keeps for
backward per micro-batch (each distinct storage once, weights excluded: what sequence
parallelism shrinks; not measured with activation checkpointing, whose blocks save through
hooks of their own) and the peak memory
of a rank (resident set on CPU, allocator peak on an accelerator). On 2 CPU cores these are
correctness-scale numbers: ranks share the cores, so more ranks are slower, and the state and
saved-activation columns are the ones that carry over to real devices.

    python benchmarks/parallel_layouts.py                 # all layouts, prints one JSON object
    python benchmarks/parallel_layouts.py --layouts 1 fsdp=2 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

LAYOUTS = {
    "1": (1, []),
    "dp=2": (2, ["parallel=data_parallel"]),
    "fsdp=2": (2, ["parallel.dp_shard=2"]),
    "tp=2": (2, ["parallel.tp=2"]),
    "tp=2+sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "ep=2": (2, ["parallel.dp_shard=2", "parallel.ep=2"]),
    "pp=2": (2, ["parallel.pp=2", "train.micro_batch_size=3"]),
    "fsdp=2+engram_rows": (2, ["parallel.dp_shard=2", "parallel.engram_row_shard=true"]),
    "fsdp=2+full_ac": (2, ["parallel.dp_shard=2", "parallel.activation_checkpoint=full"]),
    "fsdp=2+selective_ac": (2, ["parallel.dp_shard=2", "parallel.activation_checkpoint=selective"]),
    "fsdp=2xep=2": (4, ["parallel.dp_shard=4", "parallel.ep=2", "train.micro_batch_size=3"]),
    "pp=2xtp=2": (4, ["parallel.pp=2", "parallel.tp=2", "train.micro_batch_size=3"]),
    # the recipe's default optimizer is Muon (optim=muon_v4): AdamW's step beside it
    "1+adamw": (1, ["optim=adamw_cosine"]),
    "fsdp=2+adamw": (2, ["parallel.dp_shard=2", "optim=adamw_cosine"]),
}
# The tiny recipe with its global batch of 12 in micro-batches of 6 (2 per data-parallel rank).
BASE = ["model=tiny", "train.micro_batch_size=6", "backend=cpu", "logging.console=plain"]


def held_mib(trainer) -> dict[str, float]:
    """MiB of every tensor this rank holds once a step's backward is complete, by kind: its
    shards of parameters, gradients and AdamW state, and its buffers (each storage once)."""
    from birkhoff.parallel.memory import held_bytes

    held: dict[str, int] = {}
    hook = lambda t: held.update(held_bytes(t.model_parts, t.optimizers))  # noqa: E731
    trainer.after_backward.append(hook)
    trainer.train_step()
    trainer.after_backward.remove(hook)
    return {kind: size / 2**20 for kind, size in held.items()}


def saved_for_backward_mib(trainer) -> float:
    """MiB autograd saves for backward during one training step, per micro-batch of this rank
    (distinct storages; weights, the leaves that require grad, excluded)."""
    # Held until the step ends, so that no freed address is reused and counted once for two.
    storages: dict[int, tuple[object, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not (tensor.is_leaf and tensor.requires_grad):  # weights (FSDP's gathered ones too)
            with torch.no_grad():
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            try:
                storage = local.untyped_storage()
                storages[storage.data_ptr()] = (storage, storage.nbytes())
            except RuntimeError:  # a collective's output wrapper, which has no storage of its own
                storages[id(tensor)] = (tensor, local.numel() * local.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.train_step()
    return sum(size for _, size in storages.values()) / 2**20 / trainer.grad_accum


def worker(out_dir: str, steps: int, warmup: int, overrides: list[str]) -> None:
    """One rank: train warmup + steps steps, write this rank's measurements."""
    from hydra import compose, initialize_config_module

    from birkhoff.data import open_data
    from birkhoff.launch.recipe import load_recipe, recipe_to_dict
    from birkhoff.parallel import distributed, resolve_device
    from birkhoff.parallel.device import peak_memory_mib
    from birkhoff.parallel.distributed import env_rank
    from birkhoff.train.entry import train_recipe_from_dict
    from birkhoff.train.metrics import MetricLogger
    from birkhoff.train.trainer import Trainer

    with initialize_config_module(config_module="birkhoff.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=BASE + overrides)
    recipe = train_recipe_from_dict(recipe_to_dict(load_recipe(cfg, env={})[0]))
    rank, local_rank, world = env_rank()
    device = resolve_device(recipe.backend.device, local_rank)
    with distributed(device, recipe.parallel.degrees(world)) as ctx:
        trainer = Trainer(recipe, open_data(recipe.data), ctx, device, MetricLogger([]))
        times, optimizer_times = [], []
        steps_before = [optimizer.step for optimizer in trainer.optimizers]  # the LR scheduler's
        for optimizer in trainer.optimizers:
            optimizer.step = _timed(optimizer.step, optimizer_times)
        for index in range(warmup + steps):
            optimizer_times.append(0.0)
            start = time.perf_counter()
            trainer.train_step()
            if index >= warmup:
                times.append(time.perf_counter() - start)
        for optimizer, step in zip(trainer.optimizers, steps_before, strict=True):
            optimizer.step = step
        result = {
            "tokens_per_s": trainer.tokens_per_step / min(times),
            "step_s": min(times),
            # the optimizers' steps (Muon's all-to-alls and owners' Newton-Schulz runs
            # included) in the fastest step's terms: the least over the timed steps
            "optimizer_step_s": min(optimizer_times[warmup:]),
            "held_mib": held_mib(trainer),
            # Checkpointed blocks save through their own hooks, which hide them from ours.
            "saved_mib": None
            if recipe.parallel.activation_checkpoint != "none"
            else saved_for_backward_mib(trainer),
            "peak_mib": peak_memory_mib(device),
        }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def _timed(step, times: list[float]):
    """`step`, adding its time to the last entry of `times`."""

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = step(*args, **kwargs)
        times[-1] += time.perf_counter() - start
        return out

    return timed


def run_layout(name: str, steps: int, warmup: int, work: Path) -> dict:
    ranks, overrides = LAYOUTS[name]
    out = work / name
    out.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={ranks}", __file__, "--worker", str(out), str(steps), str(warmup),
        *overrides, f"launch.nproc_per_node={ranks}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"layout {name} failed:\n{result.stderr[-3000:]}")
    per_rank = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {
        "ranks": ranks,
        "tokens_per_s": per_rank[0]["tokens_per_s"],
        # the slowest rank's (its peers wait for it at the next collective)
        "optimizer_step_s": max(r["optimizer_step_s"] for r in per_rank),
        "optimizer_share_of_step": max(r["optimizer_step_s"] / r["step_s"] for r in per_rank),
        # the rank holding the most; its split by kind
        "held_mib_per_rank": max(sum(r["held_mib"].values()) for r in per_rank),
        "held_split_mib": max(per_rank, key=lambda r: sum(r["held_mib"].values()))["held_mib"],
        "saved_for_backward_mib_per_rank": None
        if per_rank[0]["saved_mib"] is None
        else max(r["saved_mib"] for r in per_rank),
        "peak_mib_per_rank": max(r["peak_mib"] for r in per_rank),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    names = ["1", *[n for n in args.layouts if n != "1"]]
    with tempfile.TemporaryDirectory() as work:
        results = {name: run_layout(name, args.steps, args.warmup, Path(work)) for name in names}
    base = results["1"]
    for result in results.values():
        result["tokens_per_s_vs_1_rank"] = result["tokens_per_s"] / base["tokens_per_s"]
        result["held_vs_1_rank"] = result["held_mib_per_rank"] / base["held_mib_per_rank"]
        result["peak_vs_1_rank"] = result["peak_mib_per_rank"] / base["peak_mib_per_rank"]
        saved = result["saved_for_backward_mib_per_rank"]
        result["saved_vs_1_rank"] = saved and saved / base["saved_for_backward_mib_per_rank"]
    report = {
        "model": "tiny",
        "device": "cpu (gloo)" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "cpu_cores": os.cpu_count(),
        "steps": args.steps,
        "layouts": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    else:
        main()
