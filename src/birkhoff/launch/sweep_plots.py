"""The sweep report's PNG plots (matplotlib, the `plots` extra): held-out loss against the swept
value, every job's loss curve, and where the jobs logged them the residual gain and gradient
norm (hc/mhc) and the Engram gate and row coverage over steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt

from birkhoff.launch.sweep_report import JobResult, PointResult

SMOOTH_WINDOW = 20  # steps in the running mean of the loss curves


def write_plots(
    sweep_dir: Path, record: dict[str, Any], jobs: list[JobResult], grid: list[PointResult]
) -> list[str]:
    names = [_heldout(sweep_dir, record, jobs, grid), _curves(sweep_dir, record, jobs)]
    gains = ("mhc_gain_bwd", "residual composite gain (max column sum, log scale)")
    for metric, label, log in (
        (*gains, True),
        ("grad_norm", "gradient norm", True),
        ("engram_gate_mean", "mean Engram gate", False),
        ("engram_rows_touched", "share of Engram table rows touched so far", False),
    ):
        if metric in ("mhc_gain_bwd", "grad_norm") and not record["key"].startswith(
            "model.residual."
        ):
            continue  # the residual sweep's plots
        if any(metric in job.curves for job in jobs):
            names.append(_over_steps(sweep_dir, record, jobs, metric, label, log))
    return names


def _positions(values: list[Any]) -> tuple[list[float], bool]:
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return ([float(v) for v in values] if numeric else list(range(len(values)))), numeric


def _heldout(
    sweep_dir: Path, record: dict[str, Any], jobs: list[JobResult], grid: list[PointResult]
) -> str:
    values = [p.value for p in grid]
    xs, numeric = _positions(values)
    at = dict(zip(map(str, values), xs, strict=True))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    seeds = [(at[str(j.value)], j.heldout_loss) for j in jobs if j.status == "finished"]
    if seeds:
        ax.scatter(*zip(*seeds, strict=True), s=12, color="0.6", label="one seed", zorder=2)
    done = [(x, p) for x, p in zip(xs, grid, strict=True) if p.heldout_mean is not None]
    if done:
        ax.errorbar(
            [x for x, _ in done],
            [p.heldout_mean for _, p in done],
            yerr=[p.heldout_std or 0.0 for _, p in done],
            marker="o",
            linestyle="-" if numeric else "none",  # categories have no order to join
            capsize=4,
            label="mean ± std over seeds",
            zorder=3,
        )
        best_x, best = next((x, p) for x, p in done if p.best)
        ax.scatter([best_x], [best.heldout_mean], marker="*", s=220, color="C3", zorder=4,
                   label=f"best: {best.value}")  # fmt: skip
    if record.get("reference_range"):
        low, high = record["reference_range"]
        ax.axvspan(low, high, color="C2", alpha=0.15, label=record.get("reference_label"))
    if not numeric:
        ax.set_xticks(xs, [str(v) for v in values])
    elif record["key"].endswith("table_size"):
        ax.set_xscale("log", base=2)
    partial = sum(p.finished for p in grid) < sum(p.seeds for p in grid)
    ax.set_xlabel(record["key"])
    ax.set_ylabel("held-out loss")
    ax.set_title(f"sweep {record['name']}" + (" (PARTIAL)" if partial else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, sweep_dir, "heldout_loss.png")


def _colours(jobs: list[JobResult]) -> dict[str, Any]:
    values = list(dict.fromkeys(str(j.value) for j in jobs))
    cmap = plt.get_cmap("viridis", max(2, len(values)))
    return {v: cmap(i) for i, v in enumerate(values)}


def _curves(sweep_dir: Path, record: dict[str, Any], jobs: list[JobResult]) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colour, labelled = _colours(jobs), set()
    for job in jobs:
        points = job.curves.get("loss")
        if not points:
            continue
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        smooth = [
            sum(losses[max(0, i - SMOOTH_WINDOW + 1) : i + 1])
            / (i + 1 - max(0, i - SMOOTH_WINDOW + 1))
            for i in range(len(losses))
        ]
        value = str(job.value)
        ax.plot(steps, smooth, color=colour[value], lw=1,
                label=None if value in labelled else f"{record['key']}={value}")  # fmt: skip
        labelled.add(value)
        evals = job.curves.get("eval_loss", [])
        if evals:
            ax.plot(*zip(*evals, strict=True), "o", color=colour[value], ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (running mean of {SMOOTH_WINDOW}); dots: held-out")
    ax.set_title(f"sweep {record['name']}: every job")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, sweep_dir, "loss_curves.png")


def _over_steps(
    sweep_dir: Path, record: dict[str, Any], jobs: list[JobResult], metric: str, label: str,
    log: bool,
) -> str:  # fmt: skip
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colour, labelled = _colours(jobs), set()
    for job in jobs:
        points = job.curves.get(metric)
        if not points:
            continue
        value = str(job.value)
        ax.plot(*zip(*points, strict=True), color=colour[value], lw=1,
                label=None if value in labelled else f"{record['key']}={value}")  # fmt: skip
        labelled.add(value)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(f"sweep {record['name']}: {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, sweep_dir, f"{metric}.png")


def _save(fig: Any, sweep_dir: Path, name: str) -> str:
    fig.tight_layout()
    tmp = sweep_dir / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(sweep_dir / name)
    return name
