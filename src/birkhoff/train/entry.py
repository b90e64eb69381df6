"""What one rank runs: build everything from the recipe, train, write the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from birkhoff.atomic import write_text_atomic
from birkhoff.data import prepare_data
from birkhoff.data.tokenizer import Tokenizer
from birkhoff.errors import require
from birkhoff.model import ModelConfig
from birkhoff.parallel import distributed, resolve_device
from birkhoff.parallel.distributed import env_rank
from birkhoff.train.metrics import build_metric_logger
from birkhoff.train.recipe import TrainRecipe
from birkhoff.train.secrets import redact
from birkhoff.train.trainer import Trainer

SUMMARY_FILE = "summary.json"


def train_recipe_from_dict(recipe: dict[str, Any]) -> TrainRecipe:
    """Typed sections from an already validated plain dict (extra top-level keys are ignored)."""
    sections = {key: value for key, value in recipe.items() if key in TrainRecipe.__annotations__}
    merged = OmegaConf.merge(OmegaConf.structured(TrainRecipe), sections)
    return OmegaConf.to_object(merged)


def check_tokenizer_matches(tokenizer: Tokenizer, model: ModelConfig) -> None:
    require(
        tokenizer.vocab_size == model.vocab_size,
        "model.vocab_size",
        model.vocab_size,
        f"must equal the tokenizer's vocabulary size {tokenizer.vocab_size} ({tokenizer.path})",
    )


def run_rank(recipe: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Entry point of every rank (torchrun's launcher calls it); returns the run summary."""
    train_recipe = train_recipe_from_dict(recipe)
    _, local_rank, _ = env_rank()
    device = resolve_device(train_recipe.backend.device, local_rank)
    with distributed(device) as ctx:
        data = prepare_data(train_recipe.data)
        check_tokenizer_matches(data.tokenizer, train_recipe.model)
        metrics = build_metric_logger(
            train_recipe.logging,
            Path(run_dir),
            train_recipe.train.steps,
            redact(recipe),
            ctx.is_main,
        )
        try:
            summary = Trainer(train_recipe, data, ctx, device, metrics).fit()
        finally:
            metrics.close()
    if ctx.is_main:
        summary["tokenizer"] = {"path": str(data.tokenizer.path), "sha256": data.tokenizer.sha256()}
        write_text_atomic(Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        print(
            f"done: {summary['steps']} steps | first loss {summary['first_loss']:.4f} | "
            f"last loss {summary['last_loss']:.4f} | held-out loss {summary['heldout_loss']:.4f} "
            f"| {summary['tokens_per_s']:.0f} tokens/s | run dir {run_dir}",
            flush=True,
        )
    return summary
