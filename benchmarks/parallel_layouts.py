"""Throughput and memory per rank of parallel layouts, relative to 1 rank in the same run.

Every layout trains the `tiny` recipe (mHC + MoE + Engram) on the shipped corpus through the
real Trainer, started by torchrun on gloo (CPU) or nccl/hccl (accelerators). Per layout it
reports tokens/s of the whole run (global batch / step time, median of the timed steps), the
model state a rank holds (its shards of parameters, gradients and AdamW moments) and the peak
memory of a rank (resident set on CPU, allocator peak on an accelerator). On 2 CPU cores
these are correctness-scale numbers: ranks share the cores, so more ranks are slower, and the
state column is the meaningful one there.

    python benchmarks/parallel_layouts.py                 # all layouts, prints one JSON object
    python benchmarks/parallel_layouts.py --layouts 1 fsdp=2 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    "ep=2": (2, ["parallel.dp_shard=2", "parallel.ep=2"]),
    "pp=2": (2, ["parallel.pp=2", "train.micro_batch_size=3"]),
    "fsdp=2+engram_rows": (2, ["parallel.dp_shard=2", "parallel.engram_row_shard=true"]),
    "fsdp=2+full_ac": (2, ["parallel.dp_shard=2", "parallel.activation_checkpoint=full"]),
    "fsdp=2xep=2": (4, ["parallel.dp_shard=4", "parallel.ep=2", "train.micro_batch_size=3"]),
    "pp=2xtp=2": (4, ["parallel.pp=2", "parallel.tp=2", "train.micro_batch_size=3"]),
}
# The tiny recipe with its global batch of 12 in micro-batches of 6 (2 per data-parallel rank).
BASE = ["model=tiny", "train.micro_batch_size=6", "backend=cpu", "logging.console=plain"]


def state_bytes(trainer) -> int:
    """Bytes of this rank's shards of parameters, gradients and optimizer state."""

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    total = 0
    for part in trainer.model_parts:
        for param in part.parameters():
            total += 2 * local(param).numel() * param.element_size()  # weights and gradients
    for state in (s for optimizer in trainer.optimizers for s in optimizer.state.values()):
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += local(value).numel() * value.element_size()
    return total


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
        times = []
        for index in range(warmup + steps):
            start = time.perf_counter()
            trainer.train_step()
            if index >= warmup:
                times.append(time.perf_counter() - start)
        result = {
            "tokens_per_s": trainer.tokens_per_step / statistics.median(times),
            "state_mib": state_bytes(trainer) / 2**20,
            "peak_mib": peak_memory_mib(device),
        }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


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
        "state_mib_per_rank": max(r["state_mib"] for r in per_rank),
        "peak_mib_per_rank": max(r["peak_mib"] for r in per_rank),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    names = ["1", *[n for n in args.layouts if n != "1"]]
    with tempfile.TemporaryDirectory() as work:
        results = {name: run_layout(name, args.steps, args.warmup, Path(work)) for name in names}
    base = results["1"]
    for result in results.values():
        result["tokens_per_s_vs_1_rank"] = result["tokens_per_s"] / base["tokens_per_s"]
        result["state_vs_1_rank"] = result["state_mib_per_rank"] / base["state_mib_per_rank"]
        result["peak_vs_1_rank"] = result["peak_mib_per_rank"] / base["peak_mib_per_rank"]
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
