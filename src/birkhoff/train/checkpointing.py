"""Saving and resuming a Trainer: what goes into a checkpoint besides the tensors, and how a
resumed run continues (on the same or another layout)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from birkhoff.checkpoint import CheckpointError, CheckpointManager
from birkhoff.checkpoint.manager import complete_checkpoints, read_meta
from birkhoff.checkpoint.state import rng_states, set_rng_states
from birkhoff.model.config import ModelConfig
from birkhoff.parallel.distributed import DistributedContext
from birkhoff.train.failures import TrainingError
from birkhoff.train.recipe import TrainRecipe
from birkhoff.train.secrets import scrub_recipe

if TYPE_CHECKING:
    from birkhoff.train.trainer import Trainer


def checkpoint_root(recipe: TrainRecipe, run_dir: Path | None) -> Path | None:
    """Where the run's checkpoints go: `checkpoint.dir`, else RUN_DIR/checkpoints."""
    if recipe.checkpoint.dir:
        return Path(recipe.checkpoint.dir)
    return None if run_dir is None else run_dir / "checkpoints"


def checkpoint_manager(
    recipe: TrainRecipe, run_dir: Path | None, ctx: DistributedContext
) -> CheckpointManager | None:
    root = checkpoint_root(recipe, run_dir)
    if root is None:
        return None
    return CheckpointManager(
        root, recipe.checkpoint, ctx.rank, ctx.mesh is not None, ctx.collective_timeout
    )


def resume_after_restart(recipe: TrainRecipe, run_dir: Path) -> str | None:
    """What a worker group restarted by the elastic agent resumes from: the run's newest
    complete checkpoint, else what the recipe said (a given checkpoint, or a fresh start)."""
    root = checkpoint_root(recipe, run_dir)
    if root is not None and complete_checkpoints(root):
        return "auto"
    return recipe.train.resume


def refuse_non_finite_parameters(trainer: Trainer) -> None:
    """A checkpoint is never written from parameters holding inf or nan (resume=auto would
    reload them); every rank checks its shards and all agree."""
    bad = torch.zeros((), dtype=torch.float64)
    for part in trainer.model_parts:
        for param in part.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            if not torch.isfinite(local).all():
                bad.fill_(1)
                break
    if trainer.ctx.all_reduce_max(bad, None).item():
        raise TrainingError(
            f"after step {trainer.step} the parameters hold inf or nan, so no checkpoint was "
            "written; resume from the last checkpoint with a lower optim.lr"
        )


def save(trainer: Trainer, manager: CheckpointManager) -> float:
    """Checkpoint the trainer after its current step; returns the seconds the step waited."""
    ctx = trainer.ctx
    engram = trainer.engram_stats.state(trainer.model_parts, ctx, trainer.model_cfg)  # collective
    rank_state = {
        "rank": ctx.rank,
        "dp_rank": ctx.dp_rank,
        "dp_size": ctx.dp_size,
        "loader": trainer.routing.loader_state(trainer.loader),
        "rng": rng_states(),
        "anticipatory": trainer.routing.state_dict(),
        "spike_guard": trainer.guard.state_dict(),
        # sums and the union over ranks, the same on every rank: rank 0 keeps them
        "engram_stats": engram if ctx.rank == 0 else None,
    }
    meta = {
        "tokens_seen": trainer.step * trainer.tokens_per_step,
        "world_size": ctx.world_size,
        "degrees": dict(ctx.degrees) or {"world": 1},
        "model": dataclasses.asdict(trainer.model_cfg),
        "tokenizer": trainer.data.tokenizer.identity(),
        "recipe": _public_recipe(trainer),
    }
    return manager.save(trainer.step, trainer.state, rank_state, meta)


def _public_recipe(trainer: Trainer) -> dict[str, Any]:
    """The recipe as the launcher published it; a trainer built without one (tests, tools)
    records its own, scrubbed of the environment's secrets."""
    if trainer.public_recipe is not None:
        return trainer.public_recipe
    return scrub_recipe(dataclasses.asdict(trainer.recipe))


def resume(trainer: Trainer, manager: CheckpointManager) -> None:
    """Continue from `train.resume`, if set (auto without a checkpoint starts fresh)."""
    path = manager.resolve(trainer.recipe.train.resume)
    if path is None:
        if trainer.recipe.train.resume and trainer.ctx.is_main:
            print(f"birkhoff: no complete checkpoint in {manager.root}; starting at step 0")
        return
    meta = read_meta(path)
    check_model(meta["model"], dataclasses.asdict(trainer.model_cfg), path)
    manager.load(path, trainer.state)
    trainer.step = int(meta["step"])
    _restore_rank_state(trainer, manager.rank_states(path), meta)
    if trainer.ctx.is_main:
        print(f"birkhoff: resumed from {path} at step {trainer.step}; {_changes(trainer, meta)}")


def check_model(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint of another model. A key the checkpoint lacks was added to birkhoff
    after it was written, with a default that keeps the old behaviour: it matches that default."""
    recorded = {**flatten_config(dataclasses.asdict(ModelConfig())), **flatten_config(saved)}
    differences = [
        f"model.{key}: {recorded.get(key)!r} in the checkpoint, {value!r} now"
        for key, value in flatten_config(current).items()
        if recorded.get(key) != value
    ]
    if differences:
        raise CheckpointError(
            f"{path} holds another model ({'; '.join(differences)}); resume with the "
            "checkpoint's model settings (its meta.json has them)"
        )


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _restore_rank_state(trainer: Trainer, saved: list[dict], meta: dict[str, Any]) -> None:
    """The loader continues from the state of the same data-parallel rank (any rank's state
    when the data-parallel degree changed: the loader remaps or refuses). RNG states return
    only on the same layout, where each rank finds its own."""
    ctx = trainer.ctx
    same_dp = saved[0]["dp_size"] == ctx.dp_size
    wanted = ctx.dp_rank if same_dp else 0
    loader_state = next(s for s in saved if s["dp_rank"] == wanted)["loader"]
    trainer.loader.load_state_dict(loader_state)
    same_world = meta["world_size"] == ctx.world_size and len(saved) > ctx.rank
    if same_world:
        set_rng_states(saved[ctx.rank]["rng"])
    # Recorded experts are per rank's tokens: usable only on the very same layout.
    same_layout = same_world and meta["degrees"] == (dict(ctx.degrees) or {"world": 1})
    mine = saved[ctx.rank] if same_layout else saved[0]
    trainer.routing.load_state_dict(mine.get("anticipatory"), same_layout, trainer.device)
    # Every rank saved the same guard state, so any rank's serves any layout.
    trainer.guard.load_state_dict(saved[0].get("spike_guard"))
    engram = saved[0].get("engram_stats", saved[0].get("engram_rows_touched"))  # (older name)
    trainer.engram_stats.load(trainer.model_parts, ctx, engram)


def _changes(trainer: Trainer, meta: dict[str, Any]) -> str:
    now = dict(trainer.ctx.degrees) or {"world": 1}
    if meta["world_size"] == trainer.ctx.world_size and meta["degrees"] == now:
        return "same layout"
    return (
        f"saved with {meta['world_size']} rank(s) {meta['degrees']}, now "
        f"{trainer.ctx.world_size} rank(s) {now}: model and optimizer resharded, data "
        "loader remapped to the new data-parallel degree"
    )
