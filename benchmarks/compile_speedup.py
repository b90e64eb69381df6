"""What train.compile buys: the same `birkhoff train` run eager and compiled, in this process's
children one after the other. Reports each run's median step time (the steps after the
first), the compiled run's first step (a cold compile: inductor's caches start empty, in a
temporary directory; on a CPU its C++ builds dominate), the step-time ratio eager / compiled
and the largest loss difference. Prints one JSON object.

    python benchmarks/compile_speedup.py --model tiny --steps 12 --activation-checkpoint none
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--activation-checkpoint", default="none", choices=("none", "full"))
    parser.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager"))
    args = parser.parse_args()
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
