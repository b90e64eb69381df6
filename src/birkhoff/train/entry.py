"""What one rank runs: build everything from the recipe, train, write the summary."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from birkhoff.data import DataPlan, heldout_windows, open_data
from birkhoff.errors import require
from birkhoff.model.budget import count_parameters
from birkhoff.model.summary import describe_split
from birkhoff.parallel import distributed, resolve_device
from birkhoff.parallel.distributed import describe_layout, env_rank
from birkhoff.train.metrics import build_metric_logger
from birkhoff.train.recipe import TrainRecipe
from birkhoff.train.run_files import (
    RECIPE_FILE,
    refuse_used_run_dir,
    write_recipe,
    write_summary,
    write_tokenizer,
)
from birkhoff.train.secrets import redact
from birkhoff.train.trainer import Trainer


def train_recipe_from_dict(recipe: dict[str, Any]) -> TrainRecipe:
    """Typed sections from an already validated plain dict (extra top-level keys are ignored)."""
    sections = {key: value for key, value in recipe.items() if key in TrainRecipe.__annotations__}
    merged = OmegaConf.merge(OmegaConf.structured(TrainRecipe), sections)
    return OmegaConf.to_object(merged)


def check_data(data: DataPlan, recipe: TrainRecipe) -> None:
    """The tokenizer fits the model and the held-out split holds every evaluation batch (this
    also reads the first documents of every source, so broken inputs show up before training)."""
    tokenizer = data.tokenizer
    require(
        tokenizer.vocab_size == recipe.model.vocab_size,
        "model.vocab_size",
        recipe.model.vocab_size,
        f"must equal the tokenizer's vocabulary size {tokenizer.vocab_size} ({tokenizer.path})",
    )
    heldout_windows(data, recipe.train.eval_batches * recipe.train.global_batch_size)


def run_rank(recipe: dict[str, Any], run_dir: str, data: DataPlan | None = None) -> dict[str, Any]:
    """Entry point of every rank (torchrun's launcher calls it); returns the run summary.

    `data` lets a single-process caller pass what it already opened; ranks open it again (the
    tokenizer is cached by then).
    """
    train_recipe = train_recipe_from_dict(recipe)
    public_recipe = redact(recipe)
    run_path = Path(run_dir)
    _, local_rank, _ = env_rank()
    device = resolve_device(train_recipe.backend.device, local_rank)
    degrees = train_recipe.parallel.degrees(env_rank()[2])
    with distributed(device, degrees) as ctx:
        data = data or open_data(train_recipe.data)
        if ctx.is_main:
            if not train_recipe.train.resume:  # resuming continues the run dir's files
                refuse_used_run_dir(run_path)
            if not (run_path / RECIPE_FILE).exists():
                write_recipe(run_path, public_recipe)
            write_tokenizer(run_path, data.tokenizer.identity())
        metrics = build_metric_logger(
            train_recipe.logging, run_path, train_recipe.train.steps, public_recipe, ctx.is_main
        )
        try:
            trainer = Trainer(train_recipe, data, ctx, device, metrics, run_path)
            if ctx.is_main:
                print(f"birkhoff: {describe_split(trainer.model_cfg)}", flush=True)
                print(f"birkhoff: layout {describe_layout(ctx)}, device {device.type}", flush=True)
            summary = trainer.fit()
        finally:
            metrics.close()
    if ctx.is_main:
        summary["parameters"] = count_parameters(trainer.model_cfg).as_dict()
        summary["parallel"] = dict(ctx.degrees)
        summary["tokenizer"] = data.tokenizer.identity()
        write_summary(run_path, summary)
        print(
            f"done: {summary['steps']} steps | first loss {summary['first_loss']:.4f} | "
            f"last loss {summary['last_loss']:.4f} | held-out loss {summary['heldout_loss']:.4f} "
            f"| {summary['tokens_per_s']:.0f} tokens/s | run dir {run_dir}",
            flush=True,
        )
    if summary["stopped_by"] and ctx.world_size > 1:
        # The launcher got the signal too and is shutting down: torchrun's worker wrapper
        # would wait for it to collect this return value until it kills the rank.
        raise SystemExit(128 + signal.Signals[summary["stopped_by"]])
    return summary
