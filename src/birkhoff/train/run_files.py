"""The files of a run dir. Only global rank 0 writes them, each whole or not at all."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from birkhoff.atomic import write_text_atomic
from birkhoff.errors import RecipeError

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TOKENIZER_FILE = "tokenizer.json"


def refuse_used_run_dir(run_dir: Path) -> None:
    """A new run never appends to, or overwrites, the files of an earlier run in the same dir.
    A run that failed before its first step (a refused checkpoint, bad data) trained nothing:
    its dir may be used again."""
    metrics = run_dir / METRICS_FILE
    used = [
        name
        for name, taken in (
            (SUMMARY_FILE, (run_dir / SUMMARY_FILE).exists()),
            (METRICS_FILE, metrics.is_file() and metrics.stat().st_size > 0),
            ("checkpoints/", any((run_dir / "checkpoints").glob("step-*/COMPLETE"))),
        )
        if taken
    ]
    if used:
        raise RecipeError(
            "hydra.run.dir",
            str(run_dir),
            f"already holds a run ({', '.join(used)}); choose a new directory",
        )


def write_recipe(run_dir: Path, recipe: dict[str, Any]) -> None:
    write_text_atomic(run_dir / RECIPE_FILE, OmegaConf.to_yaml(recipe))


def write_tokenizer(run_dir: Path, identity: dict[str, str]) -> None:
    """Which tokenizer (path and sha256) the run reads its data with."""
    write_text_atomic(run_dir / TOKENIZER_FILE, json.dumps(identity, indent=2) + "\n")


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    text = json.dumps(finite_or_null(summary), indent=2, allow_nan=False)
    write_text_atomic(run_dir / SUMMARY_FILE, text + "\n")


def finite_or_null(value: Any) -> Any:
    """inf and nan are not JSON (a run with no finite step has a nan loss): null instead."""
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def finished_summary(run_dir: Path, steps: int) -> dict[str, Any] | None:
    """The summary of a run dir whose run trained all `steps` steps and was not stopped early
    (a stopped run writes one too, to be resumed); None otherwise."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if summary.get("stopped_by") is None and summary.get("steps") == steps:
        return summary
    return None
