"""What train.compile buys: the same `birkhoff train` run eager and compiled, in this process's
children one after the other. Reports each run's median step time (the steps after the
first), the compiled run's first step (a cold compile: inductor's caches start empty, in a
temporary directory; on a CPU its C++ builds dominate), the step-time ratio eager / compiled
and the largest loss difference. Prints one JSON object.

    python benchmarks/compile_speedup.py --model tiny --steps 12 --activation-checkpoint none

Two processes one after the other differ by 20-40% on a shared machine. `--alternate` builds
both models in this process instead (as model_throughput.py builds them, AdamW) and takes
their steps in turns, each round in the other order; it reports the medians and their ratio,
and the compiled model's first step (its compile, on inductor's cache as it is):

    python benchmarks/compile_speedup.py --model tiny --alternate --steps 20
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
from model_throughput import SHAPES, build, step

from birkhoff.parallel.activation_checkpoint import apply_activation_checkpointing
from birkhoff.parallel.compile import compile_blocks
from birkhoff.parallel.parallelize import block_slots


def run(run_dir: Path, args: argparse.Namespace, compiled: bool) -> dict:
    command = [
        sys.executable, "-m", "birkhoff.launch.cli", "train", f"hydra.run.dir={run_dir}",
        f"model={args.model}", f"train.steps={args.steps}", "optim.warmup_steps=1",
        "train.eval_every=0", "backend=cpu", "logging.console=plain", "checkpoint.every=0",
        f"parallel.activation_checkpoint={args.activation_checkpoint}",
        f"train.compile={str(compiled).lower()}", f"train.compile_backend={args.backend}",
    ]  # fmt: skip
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor-cache")}
    subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["losses"] = [r["loss"] for r in records if "loss" in r]
    return summary


def alternate(args: argparse.Namespace) -> dict:
    """Eager and compiled models of the same weights, their steps taken in turns."""
    models = {}
    for compiled in (False, True):
        net, optimizer = build(args.model, [], False, "cpu", torch.device("cpu"))
        apply_activation_checkpointing(block_slots(net), args.activation_checkpoint)
        if compiled:
            compile_blocks(block_slots(net), args.backend)
        models["compiled" if compiled else "eager"] = (net, optimizer)
    batch, seq = SHAPES[args.model]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, models["eager"][0].cfg.vocab_size, (batch, seq + 1), generator=generator
    )
    first = {}
    for name, (net, optimizer) in models.items():  # the compiled one compiles here
        start = time.perf_counter()
        step(net, optimizer, tokens, bf16=False)
        first[name] = time.perf_counter() - start
        step(net, optimizer, tokens, bf16=False)
    seconds = {name: [] for name in models}
    for i in range(args.steps):
        for name in sorted(models, reverse=bool(i % 2)):
            start = time.perf_counter()
            step(*models[name], tokens, bf16=False)
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    return {
        "model": args.model, "steps": args.steps, "backend": args.backend, "alternate": True,
        "activation_checkpoint": args.activation_checkpoint,
        "eager_median_step_s": median["eager"], "compiled_median_step_s": median["compiled"],
        "speedup": median["eager"] / median["compiled"],
        "compiled_first_step_s": first["compiled"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--activation-checkpoint", default="none", choices=("none", "full"))
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager"))
    parser.add_argument("--alternate", action="store_true", help="both in this process, in turns")
    args = parser.parse_args()
    if args.alternate:
        if args.model not in SHAPES:
            parser.error(f"--alternate takes --model {' or '.join(SHAPES)}, got {args.model}")
        print(json.dumps(alternate(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        eager = run(Path(tmp) / "eager", args, compiled=False)
        compiled = run(Path(tmp) / "compiled", args, compiled=True)
    diff = max(abs(a - b) for a, b in zip(eager["losses"], compiled["losses"], strict=True))
    print(json.dumps({
        "model": args.model, "steps": args.steps, "backend": args.backend,
        "activation_checkpoint": args.activation_checkpoint,
        "eager_median_step_s": eager["median_step_s"],
        "compiled_median_step_s": compiled["median_step_s"],
        "speedup": eager["median_step_s"] / compiled["median_step_s"],
        "compiled_first_step_s": compiled["first_step_s"],
        "graphs": compiled["compile"]["graphs"],
        "graph_breaks": compiled["compile"]["graph_breaks"],
        "max_loss_difference": diff,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
