"""A forced loss spike and its recovery, and what Anticipatory Routing costs per step.

Four `birkhoff train` runs of one model, one after another, in OUT/<name>/:
- `clean`: no fault;
- `fault`: the update of step --fault-step is --update-scale times too large, nothing done;
- `recovered`: the same fault, with spike handling (skip, roll back to a host snapshot, go
  on with later data) and Anticipatory Routing switched on by the rollback;
- `routing`: no fault, Anticipatory Routing on at every step (its cost: the step time ratio
  to `clean`, both measured here, and the look-ahead forward's share).
A finished run (its summary.json) is not run again. Prints one JSON object; with --plot, a
PNG of the three loss curves.

    python benchmarks/forced_spike.py --out /tmp/spike --steps 120 --fault-step 60 \\
        --plot docs/forced_spike.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def runs(args: argparse.Namespace) -> dict[str, list[str]]:
    fault = [f"train.fault.step={args.fault_step}", f"train.fault.update_scale={args.update_scale}"]
    spike = [
        "train.spike.enabled=true",
        "train.spike.window=20",
        "train.spike.loss_sigmas=4",
        "train.spike.snapshot_every=10",
    ]
    return {
        "clean": [],
        "fault": fault,
        "recovered": [
            *fault,
            *spike,
            "train.anticipatory.mode=spike",
            f"train.anticipatory.steps={args.routing_steps}",
        ],
        "routing": ["train.anticipatory.mode=always"],
    }


def train(out: Path, name: str, extra: list[str], args: argparse.Namespace) -> list[dict]:
    run_dir = out / name
    if not (run_dir / "summary.json").exists():
        overrides = [
            f"model={args.model}",
            f"train.steps={args.steps}",
            f"train.eval_every={args.steps}",
            "logging.log_every=1000",
            f"hydra.run.dir={run_dir}",
            *extra,
        ]
        command = [sys.executable, "-m", "birkhoff.launch.cli", "train", *overrides]
        subprocess.run(command, check=True, capture_output=True, text=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def step_seconds(records: list[dict], key: str = "step_time_s") -> float:
    """Median over the applied steps after the first five (start-up)."""
    return statistics.median(r[key] for r in records[5:] if not r.get("skipped"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--fault-step", type=int, default=60)
    parser.add_argument("--update-scale", type=float, default=30.0)
    parser.add_argument("--routing-steps", type=int, default=20)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    records = {name: train(args.out, name, extra, args) for name, extra in runs(args).items()}
    summaries = {n: json.loads((args.out / n / "summary.json").read_text()) for n in records}
    recovered = records["recovered"]
    rollbacks = [r for r in recovered if "rolled_back_to" in r]
    routing = step_seconds(records["routing"])
    report = {
        "model": args.model,
        "steps": args.steps,
        "fault": {"step": args.fault_step, "update_scale": args.update_scale},
        "heldout_loss": {n: s["heldout_loss"] for n, s in summaries.items()},
        "spikes": summaries["recovered"]["spikes"],
        "rollbacks": [
            {k: r[k] for k in ("step", "rolled_back_to", "rollback_skipped_batches")}
            for r in rollbacks
        ],
        "loss_after_fault": {
            n: [round(r["loss"], 4) for r in records[n] if r["step"] > args.fault_step][:5]
            for n in ("clean", "fault")
        },
        "routing_step_time_ratio": routing / step_seconds(records["clean"]),
        "routing_lookahead_share": step_seconds(records["routing"], "anticipatory_s") / routing,
    }
    print(json.dumps(report, indent=2))
    if args.plot:
        plot(records, args)


def plot(records: dict[str, list[dict]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for name, style in (("clean", "-"), ("fault", "--"), ("recovered", "-")):
        # After a rollback the step count goes back: plot against batches drawn instead.
        axes.plot(range(1, len(records[name]) + 1), [r["loss"] for r in records[name]], style,
                  label=name, linewidth=1)  # fmt: skip
    axes.axvline(args.fault_step, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("batches drawn (steps applied, skipped and abandoned)")
    axes.set_ylabel("training loss")
    axes.set_title(f"{args.model}: update of step {args.fault_step} x{args.update_scale:g}")
    axes.legend()
    figure.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
