"""`birkhoff sweep report DIR`: what every job of a sweep reached, per job and per grid point
(mean and spread over seeds), as Markdown and CSV, and the plots (launch/sweep_plots.py).

It reads only the run dirs (recipe.yaml, metrics.jsonl, summary.json, train.log), so it works
while the sweep runs: unfinished jobs are marked and count in no mean.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from birkhoff.atomic import write_text_atomic
from birkhoff.errors import RecipeError
from birkhoff.launch.recipe import typed_recipe
from birkhoff.launch.sweep_config import SweepJob, read_sweep_file
from birkhoff.launch.sweep_run import EXIT_MARK, LOG_FILE
from birkhoff.model.budget import apply_sparse_budget, count_parameters, engram_rows
from birkhoff.train.run_files import METRICS_FILE, RECIPE_FILE, SUMMARY_FILE, finished_summary

SMOOTHING = 0.1  # the smoothed train loss: mean over the last 10% of the steps


@dataclass
class JobResult:
    name: str
    value: Any
    seed: int
    status: str  # finished | stopped (SIGNAL) | failed | running (or killed) | pending
    steps: int = 0
    target_steps: int = 0
    experts: int | None = None
    engram_rows: int | None = None
    total_params: int | None = None
    active_params: int | None = None
    engram_share: float | None = None  # Engram tables / sparse parameters, as built
    final_loss: float | None = None
    smoothed_loss: float | None = None
    heldout_loss: float | None = None
    tokens_per_s: float | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict, repr=False)


@dataclass
class PointResult:
    value: Any
    finished: int
    seeds: int
    heldout_mean: float | None
    heldout_std: float | None
    final_mean: float | None
    final_std: float | None
    smoothed_mean: float | None
    smoothed_std: float | None
    tokens_per_s_mean: float | None
    tokens_per_s_std: float | None
    experts: int | None
    engram_rows: int | None
    total_params: int | None
    active_params: int | None
    engram_share: float | None
    best: bool = False


def job_result(run_dir: Path, job: SweepJob) -> JobResult:
    result = JobResult(job.name, job.value, job.seed, "pending")
    if not (run_dir / RECIPE_FILE).is_file():
        return result
    recipe = typed_recipe(OmegaConf.load(run_dir / RECIPE_FILE))
    result.target_steps = recipe.train.steps
    model = apply_sparse_budget(recipe.model)
    count = count_parameters(model)
    result.experts = model.moe.num_experts
    result.engram_rows = engram_rows(model) * len(model.engram.layers)
    result.total_params, result.active_params = count.total, count.active
    result.engram_share = count.engram_tables / count.sparse if count.sparse else 0.0
    result.curves = read_curves(run_dir / METRICS_FILE)
    losses = result.curves.get("loss", [])
    if losses:
        result.steps = losses[-1][0]
        result.final_loss = losses[-1][1]
        tail = losses[-max(1, math.ceil(len(losses) * SMOOTHING)) :]
        result.smoothed_loss = statistics.fmean(v for _, v in tail)
    evals = result.curves.get("eval_loss", [])
    speeds = [v for _, v in result.curves.get("tokens_per_s", [])]
    summary = finished_summary(run_dir, recipe.train.steps)
    if summary:
        result.status = "finished"
        result.heldout_loss = summary["heldout_loss"]
        result.tokens_per_s = summary["tokens_per_s"]
        return result
    stopped = _stopped_by(run_dir)
    if stopped:
        result.status = f"stopped ({stopped})"
    else:
        result.status = "failed" if _exit_code(run_dir) else "running (or killed)"
    result.heldout_loss = evals[-1][1] if evals else None
    result.tokens_per_s = statistics.median(speeds) if speeds else None
    return result


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric over steps; a step logged twice (a resumed run redoes the steps after its
    checkpoint) keeps its last value."""
    by_name: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        step = record.get("step")
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float) and value is not None:
                by_name.setdefault(name, {})[step] = float(value)
    return {name: sorted(points.items()) for name, points in by_name.items()}


def _stopped_by(run_dir: Path) -> str | None:
    """The signal a run stopped by at a step boundary, to be resumed (from its summary)."""
    try:
        return json.loads((run_dir / SUMMARY_FILE).read_text()).get("stopped_by")
    except (OSError, ValueError):
        return None


def _exit_code(run_dir: Path) -> int:
    log = run_dir / LOG_FILE
    if not log.is_file():
        return 0
    # The runner writes a line when it starts a job and one when the job exits.
    marks = [line for line in log.read_text().splitlines() if line.startswith("# ")]
    last = marks[-1] if marks else ""
    return int(last[len(EXIT_MARK) :]) if last.startswith(EXIT_MARK) else 0


def points(jobs: list[JobResult], values: list[Any]) -> list[PointResult]:
    rows = []
    for value in values:
        mine = [job for job in jobs if job.value == value]
        done = [job for job in mine if job.status == "finished"]
        built = next((job for job in mine if job.experts is not None), None)
        heldout_mean, heldout_std = _mean_std([job.heldout_loss for job in done])
        final_mean, final_std = _mean_std([job.final_loss for job in done])
        smoothed_mean, smoothed_std = _mean_std([job.smoothed_loss for job in done])
        speed_mean, speed_std = _mean_std([job.tokens_per_s for job in done])
        rows.append(
            PointResult(
                value=value,
                finished=len(done),
                seeds=len(mine),
                heldout_mean=heldout_mean,
                heldout_std=heldout_std,
                final_mean=final_mean,
                final_std=final_std,
                smoothed_mean=smoothed_mean,
                smoothed_std=smoothed_std,
                tokens_per_s_mean=speed_mean,
                tokens_per_s_std=speed_std,
                experts=built and built.experts,
                engram_rows=built and built.engram_rows,
                total_params=built and built.total_params,
                active_params=built and built.active_params,
                engram_share=built and built.engram_share,
            )
        )
    scored = [row for row in rows if row.heldout_mean is not None]
    if scored:
        min(scored, key=lambda row: row.heldout_mean).best = True
    return rows


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values present (the std from two on)."""
    present = [v for v in values if v is not None]
    mean = statistics.fmean(present) if present else None
    return mean, statistics.stdev(present) if len(present) > 1 else None


POINT_COLUMNS = [
    ("value", "{}"),
    ("finished", "{}"),
    ("seeds", "{}"),
    ("heldout_mean", "{:.4f}"),
    ("heldout_std", "{:.4f}"),
    ("final_mean", "{:.4f}"),
    ("final_std", "{:.4f}"),
    ("smoothed_mean", "{:.4f}"),
    ("smoothed_std", "{:.4f}"),
    ("tokens_per_s_mean", "{:.0f}"),
    ("tokens_per_s_std", "{:.0f}"),
    ("experts", "{}"),
    ("engram_rows", "{}"),
    ("engram_share", "{:.3f}"),
    ("total_params", "{}"),
    ("active_params", "{}"),
]
JOB_COLUMNS = [
    ("name", "{}"),
    ("status", "{}"),
    ("steps", "{}"),
    ("experts", "{}"),
    ("engram_rows", "{}"),
    ("engram_share", "{:.3f}"),
    ("total_params", "{}"),
    ("active_params", "{}"),
    ("final_loss", "{:.4f}"),
    ("smoothed_loss", "{:.4f}"),
    ("heldout_loss", "{:.4f}"),
    ("tokens_per_s", "{:.0f}"),
]


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    for row in rows:
        cells = ["" if row[n] is None else fmt.format(row[n]) for n, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([name for name, _ in columns])
    for row in rows:
        writer.writerow(["" if row[n] is None else row[n] for n, _ in columns])
    return out.getvalue()


def write_report(sweep_dir: Path, plots: bool = True) -> Path:
    record, jobs = read_sweep_file(sweep_dir)
    results = [job_result(sweep_dir / job.name, job) for job in jobs]
    values = list(dict.fromkeys(job.value for job in jobs))
    grid = points(results, values)
    job_rows = [{k: v for k, v in asdict(r).items() if k != "curves"} for r in results]
    point_rows = [asdict(p) for p in grid]
    shown = [{**row, "value": f"**{row['value']}** (best)" if row["best"] else row["value"]}
             for row in point_rows]  # fmt: skip
    done = sum(r.status == "finished" for r in results)
    partial = done < len(results)
    lines = [
        f"# Sweep {record['name']}: {record['key']}",
        "",
        f"{done} of {len(results)} jobs finished"
        + (" (PARTIAL: unfinished jobs count in no mean)" if partial else "")
        + f". Held-out loss: mean and sample std over the finished seeds; smoothed loss: mean"
        f" train loss of the last {SMOOTHING:.0%} of the steps.",
        "",
        "## Per value",
        "",
        markdown_table(shown, POINT_COLUMNS),
        "",
        "## Per job",
        "",
        markdown_table(job_rows, JOB_COLUMNS),
        "",
    ]
    if plots:
        from birkhoff.launch.sweep_plots import write_plots

        names = write_plots(sweep_dir, record, results, grid)
        lines += ["## Plots", "", *[f"![{name}]({name})" for name in names], ""]
    write_text_atomic(sweep_dir / "jobs.csv", csv_text(job_rows, JOB_COLUMNS))
    write_text_atomic(
        sweep_dir / "points.csv", csv_text(point_rows, [*POINT_COLUMNS, ("best", "{}")])
    )
    write_text_atomic(sweep_dir / "report.md", "\n".join(lines))
    return sweep_dir / "report.md"


def report_command(args: list[str]) -> int:
    plots = "--no-plots" not in args
    paths = [a for a in args if a != "--no-plots"]
    if len(paths) != 1:
        print("birkhoff: usage: birkhoff sweep report DIR [--no-plots]", file=sys.stderr)
        return 2
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "birkhoff: sweep report: plots need matplotlib: pip install 'birkhoff[plots]' "
                "(or pass --no-plots for the tables alone)",
                file=sys.stderr,
            )
            return 2
    try:
        path = write_report(Path(paths[0]), plots)
    except RecipeError as err:
        print(f"birkhoff: {err}", file=sys.stderr)
        return 2
    print(f"birkhoff: report written to {path} (jobs.csv, points.csv beside it)")
    return 0
