"""The files of a run dir. Only global rank 0 writes them, each whole or not at all."""

from __future__ import annotations

import json
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
    """A new run never appends to, or overwrites, the files of an earlier run in the same dir."""
    used = [name for name in (RECIPE_FILE, METRICS_FILE, SUMMARY_FILE) if (run_dir / name).exists()]
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
    write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
