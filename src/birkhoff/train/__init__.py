"""The training loop, optimizer, schedules, metrics, and the per-rank entry point."""

from birkhoff.train.entry import run_rank
from birkhoff.train.recipe import TrainRecipe

__all__ = ["TrainRecipe", "run_rank"]
