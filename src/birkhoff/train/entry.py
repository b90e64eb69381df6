"""What one rank runs: build everything from the recipe, train, write the summary."""

from __future__ import annotations

import contextlib
import os
import signal
import traceback
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from birkhoff import kernels
from birkhoff.data import DataPlan, heldout_windows, open_data
from birkhoff.errors import require
from birkhoff.model.budget import count_parameters
from birkhoff.model.summary import describe_split
from birkhoff.parallel import distributed, resolve_device
from birkhoff.parallel.compile import CompileStats, describe_compile
from birkhoff.parallel.distributed import describe_layout, env_rank
from birkhoff.rank_children import rank_process_marked
from birkhoff.train.checkpointing import resume_after_restart
from birkhoff.train.host_malloc import apply_host_malloc
from birkhoff.train.metrics import build_metric_logger
from birkhoff.train.rank_errors import (
    EXPECTED,
    EXPECTED_ERRORS,
    UNEXPECTED,
    clear_rank_errors,
    report_rank_error,
)
from birkhoff.train.recipe import TrainRecipe
from birkhoff.train.run_files import (
    RECIPE_FILE,
    refuse_used_run_dir,
    write_recipe,
    write_summary,
    write_tokenizer,
)
from birkhoff.train.run_lock import RunDirLock
from birkhoff.train.secrets import scrub_recipe, scrub_text
from birkhoff.train.stop import StopSignal
from birkhoff.train.trainer import Trainer
from birkhoff.train.watchdog import HangWatchdog, enable_nccl_flight_recorder
from birkhoff.train.weight_casts import describe_weight_casts


def train_recipe_from_dict(recipe: dict[str, Any]) -> TrainRecipe:
    """Typed sections from an already validated plain dict (extra top-level keys are ignored)."""
    sections = {key: value for key, value in recipe.items() if key in TrainRecipe.__annotations__}
    merged = OmegaConf.merge(OmegaConf.structured(TrainRecipe), sections)
    return OmegaConf.to_object(merged)


def check_data(data: DataPlan, recipe: TrainRecipe) -> None:
    """The tokenizer fits the model and the held-out split holds every evaluation batch (this
    also reads the first documents of every source, so broken inputs show up before training)."""
    tokenizer = data.tokenizer
    require(  # rows past the tokenizer are padding (V4: 129,280 rows for a smaller tokenizer)
        tokenizer.vocab_size <= recipe.model.vocab_size,
        "model.vocab_size",
        recipe.model.vocab_size,
        f"must be at least the tokenizer's vocabulary size {tokenizer.vocab_size} "
        f"({tokenizer.path}): every token id needs an embedding row",
    )
    heldout_windows(data, recipe.train.eval_batches * recipe.train.global_batch_size)


def run_rank(
    recipe: dict[str, Any],
    run_dir: str,
    data: DataPlan | None = None,
    public_recipe: dict[str, Any] | None = None,
    error_dir: str | None = None,
) -> dict[str, Any]:
    """Entry point of every rank (torchrun's launcher calls it); returns the run summary.

    `data` lets a single-process caller pass what it already opened; ranks open it again (the
    tokenizer is cached by then). `public_recipe`: the launcher's scrubbed copy of `recipe`,
    the only one written anywhere (default: `recipe` scrubbed of the environment's secrets).
    `error_dir` (multi-rank): a failing rank leaves its one-line message (or traceback) there
    for the launcher, which prints each distinct one once, and exits quietly; without it the
    error propagates to the caller.

    SIGTERM/SIGINT are recorded from the start to the end of the rank, so a signal to the
    whole process group never kills it mid-way: it finishes its step and checkpoints.
    """
    if error_dir is not None:
        clear_rank_errors(error_dir)  # an earlier attempt's, before an elastic restart
    with StopSignal() as stop, rank_process_marked():
        try:
            return _train_rank(recipe, run_dir, data, public_recipe, stop, error_dir)
        except EXPECTED_ERRORS as err:
            if error_dir is None:
                raise
            report_rank_error(error_dir, EXPECTED, scrub_text(str(err), public_recipe))
            raise SystemExit(2) from None
        except Exception:
            if error_dir is None:
                raise
            report_rank_error(
                error_dir, UNEXPECTED, scrub_text(traceback.format_exc(), public_recipe)
            )
            raise SystemExit(1) from None


def _train_rank(
    recipe: dict[str, Any],
    run_dir: str,
    data: DataPlan | None,
    public_recipe: dict[str, Any] | None,
    stop: StopSignal,
    error_dir: str | None,
) -> dict[str, Any]:
    train_recipe = train_recipe_from_dict(recipe)
    malloc_line = apply_host_malloc(train_recipe.backend.host_malloc)  # before anything big
    if public_recipe is None:
        public_recipe = scrub_recipe(recipe)
    run_path = Path(run_dir)
    rank, local_rank, world_size = env_rank()
    device = resolve_device(train_recipe.backend.device, local_rank)
    degrees = train_recipe.parallel.degrees(world_size)
    lock = RunDirLock(run_path)
    nccl = device.type == "cuda" and world_size > 1
    if nccl:
        enable_nccl_flight_recorder(run_path)
    launch = recipe.get("launch", {})
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart:  # the elastic agent restarted this worker group after a failure
        train_recipe.train.resume = resume_after_restart(train_recipe, run_path)
    watchdog = HangWatchdog(train_recipe.train.hang_timeout_s, run_path, rank, error_dir, nccl)
    timeout_s = launch.get("collective_timeout_s")
    with distributed(device, degrees, timeout_s) as ctx, contextlib.ExitStack() as cleanup:
        data = data or open_data(train_recipe.data)
        if ctx.is_main:
            lock.acquire()  # a no-op where this node's launcher holds it
            cleanup.callback(lock.release)
            if restart:
                print(
                    f"birkhoff: restart {restart} of at most {launch.get('max_restarts')} "
                    f"(launch.max_restarts); resume: {train_recipe.train.resume or 'step 0'}",
                    flush=True,
                )
            elif not train_recipe.train.resume:  # resuming continues the run dir's files
                refuse_used_run_dir(run_path)
            if not (run_path / RECIPE_FILE).exists():
                write_recipe(run_path, public_recipe)
            write_tokenizer(run_path, data.tokenizer.identity())
        metrics = build_metric_logger(
            train_recipe.logging, run_path, train_recipe.train.steps, public_recipe, ctx.is_main
        )
        try:
            trainer = Trainer(
                train_recipe, data, ctx, device, metrics, run_path, public_recipe=public_recipe
            )
            if ctx.is_main:
                print(f"birkhoff: {describe_split(trainer.model_cfg)}", flush=True)
                print(f"birkhoff: layout {describe_layout(ctx)}, device {device.type}", flush=True)
                kernel_line = kernels.describe(
                    trainer.kernel_backend, trainer.compute_dtype, trainer.residual_dtype
                )
                note = kernels.auto_note(train_recipe.backend.kernels, device.type)
                kernel_line += f" ({note})" if note else ""
                print(f"birkhoff: {kernel_line}", flush=True)
                print(f"birkhoff: {malloc_line}", flush=True)
                casts = describe_weight_casts(trainer.weight_casts, trainer.grad_accum,
                                              train_recipe.train.mixed_precision)  # fmt: skip
                print(f"birkhoff: {casts}", flush=True)
                if train_recipe.train.compile:
                    print(f"birkhoff: compile: torch.compile on {trainer.compiled_blocks} "
                          "blocks; the first step compiles them", flush=True)  # fmt: skip
                meter = trainer.mfu
                print(
                    f"birkhoff: mfu = model FLOPs ({meter.flops_per_token / 1e6:,.1f}M per token) "
                    f"over {meter.devices} x {meter.peak.tflops:.3g} TFLOP/s ({meter.peak.source})",
                    flush=True,
                )
            with watchdog:
                summary = trainer.fit(stop, watchdog, restart)
        finally:
            metrics.close()
    if ctx.is_main:
        summary["parameters"] = count_parameters(trainer.model_cfg).as_dict()
        summary["parallel"] = dict(ctx.degrees)
        summary["tokenizer"] = data.tokenizer.identity()
        summary["kernels"] = kernels.implementations(
            trainer.kernel_backend, trainer.compute_dtype, trainer.residual_dtype
        )
        if train_recipe.train.compile:
            summary["compile"] = {
                "blocks": trainer.compiled_blocks,
                "backend": train_recipe.train.compile_backend,
                **vars(CompileStats.now()),
            }
            print(f"birkhoff: compile: {describe_compile(summary)}", flush=True)
        write_summary(run_path, summary)
        print(
            f"done: {summary['steps']} steps | first loss {summary['first_loss']:.4f} | "
            f"last loss {summary['last_loss']:.4f} | held-out loss {summary['heldout_loss']:.4f} "
            f"| {summary['tokens_per_s']:.0f} tokens/s{_steady(summary)} | run dir {run_dir}",
            flush=True,
        )
    if summary["stopped_by"] and ctx.world_size > 1:
        # The launcher got the signal too and is shutting down: torchrun's worker wrapper
        # would wait for it to collect this return value until it kills the rank.
        raise SystemExit(128 + signal.Signals[summary["stopped_by"]])
    return summary


def _steady(summary: dict) -> str:
    """The median step's rate beside the wall's, when a first step (compiles) or the
    evaluations and saves make them differ."""
    steady = summary.get("steady_tokens_per_s")
    if not steady or steady < 1.2 * summary["tokens_per_s"]:
        return ""
    first = summary["first_step_s"]
    return f" ({steady:.0f} at the median step, after a first step of {first:.1f} s)"
