"""AdamW against Muon (optim=muon_v4) on one model: held-out loss at each optimizer's best of
several learning rates, over seeds, and tokens/s.

Every (optimizer, learning rate, seed) is one `birkhoff train` run in OUT/<name>/ (one at a
time, each using the machine's cores); a finished run (its summary.json) is not run again,
so an interrupted comparison continues. A run that fails (a learning rate that breaks mHC's
constraint, a non-finite loss) counts as an infinite held-out loss, its last line kept.
Prints one JSON object and a Markdown table: per optimizer and learning rate the held-out
loss (mean and spread over seeds) and tokens/s; the best learning rate of each optimizer
marked.

    python benchmarks/optimizer_comparison.py --out /tmp/optimizers --steps 300 \\
        --lrs 1e-3 3e-3 1e-2 --seeds 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

OPTIMIZERS = {"adamw": "adamw_cosine", "muon_v4": "muon_v4"}


def run(out: Path, optim: str, lr: float, seed: int, args: argparse.Namespace) -> dict:
    run_dir = out / f"{optim}-lr{lr:g}-seed{seed}"
    summary, failed = run_dir / "summary.json", run_dir / "failed.txt"
    if not summary.exists() and not failed.exists():
        overrides = [
            f"model={args.model}",
            f"optim={OPTIMIZERS[optim]}",
            f"optim.lr={lr}",
            f"train.seed={seed}",
            f"train.steps={args.steps}",
            f"train.eval_every={args.steps}",
            f"hydra.run.dir={run_dir}",
        ]
        command = [sys.executable, "-m", "birkhoff.launch.cli", "train", *overrides]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:  # e.g. a learning rate that breaks mHC's constraint
            failure = (result.stderr.strip().splitlines() or ["no output"])[-1]
            failed.write_text(failure + "\n")
    if failed.exists():
        failure = failed.read_text().strip()
        return {"heldout_loss": float("inf"), "tokens_per_s": 0.0, "failed": failure}
    return json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args()
    rows = []
    for optim in OPTIMIZERS:
        for lr in args.lrs:
            runs = [run(args.out, optim, lr, seed, args) for seed in args.seeds]
            losses = [r["heldout_loss"] for r in runs]
            rows.append(
                {
                    "optimizer": optim,
                    "lr": lr,
                    "heldout_loss": statistics.mean(losses),
                    "spread": max(losses) - min(losses),
                    "losses": losses,
                    "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
                    "failed": [r["failed"] for r in runs if "failed" in r],
                }
            )
    best = {
        optim: min((r for r in rows if r["optimizer"] == optim), key=lambda r: r["heldout_loss"])
        for optim in OPTIMIZERS
    }
    report = {
        "benchmark": "optimizer_comparison",
        "model": args.model,
        "steps": args.steps,
        "seeds": args.seeds,
        "runs": rows,
        "best": {o: {"lr": r["lr"], "heldout_loss": r["heldout_loss"]} for o, r in best.items()},
    }
    print(json.dumps(report, indent=2))
    print("\n| optimizer | lr | held-out loss (mean over seeds) | spread | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        mark = " (best)" if r is best[r["optimizer"]] else ""
        print(
            f"| {r['optimizer']} | {r['lr']:g}{mark} | {r['heldout_loss']:.4f} | "
            f"{r['spread']:.4f} | {r['tokens_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
