"""Checkpoint save and load time, and how long a background save blocks the training step.

One process trains the `small` recipe (default; --model picks another) through the real
Trainer; after one step (so AdamW state exists), each mode of `checkpoint.async_mode` (off,
thread, process) saves --repeats times, each save followed by one training step, which is
what a background save overlaps. Per mode it reports the seconds the step was blocked, the
whole save's seconds (start to COMPLETE) and the seconds of the step that ran beside the
write; then the newest checkpoint is verified (checksums) and loaded back. The comparison is
within the run: `blocked_vs_sync_save` = blocked / synchronous save time (target < 0.10).
DCP's checkpoint process starts at the first process-mode save, which is reported apart.

    python benchmarks/checkpoint_io.py                   # small, 3 saves per mode, JSON
    python benchmarks/checkpoint_io.py --model tiny --repeats 2 --modes off thread
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from birkhoff.checkpoint import CheckpointConfig, CheckpointManager
from birkhoff.checkpoint.config import ASYNC_MODES
from birkhoff.data import open_data
from birkhoff.launch.recipe import load_recipe, recipe_to_dict
from birkhoff.parallel import distributed
from birkhoff.train.checkpointing import save
from birkhoff.train.entry import train_recipe_from_dict
from birkhoff.train.metrics import MetricLogger
from birkhoff.train.trainer import Trainer


def build_trainer(model: str, ctx) -> Trainer:
    overrides = [f"model={model}", "backend=cpu", "train.steps=1000", "optim.warmup_steps=0"]
    with initialize_config_module(config_module="birkhoff.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    recipe = train_recipe_from_dict(recipe_to_dict(load_recipe(cfg, env={})[0]))
    return Trainer(recipe, open_data(recipe.data), ctx, torch.device("cpu"), MetricLogger([]))


def timed_step(trainer: Trainer) -> float:
    start = time.perf_counter()
    trainer.train_step()
    return time.perf_counter() - start


def measure_mode(trainer: Trainer, mode: str, repeats: int, root: Path) -> dict:
    manager = CheckpointManager(root, CheckpointConfig(keep_last=1, async_mode=mode), 0, False)
    blocked, written, overlapped = [], [], []
    for _ in range(repeats):
        blocked.append(save(trainer, manager))
        overlapped.append(timed_step(trainer))
        written.append(manager.completed(wait=True))
    start = time.perf_counter()
    newest = manager.resolve("auto")  # verifies every file's checksum
    verified = time.perf_counter()
    manager.load(newest, trainer.state)
    loaded = time.perf_counter()
    manager.close()
    first_apart = mode == "process" and repeats > 1  # includes starting DCP's process
    result = {
        "blocked_s": statistics.median(blocked[first_apart:]),
        "save_s": statistics.median(written[first_apart:]),
        "step_s_beside_write": statistics.median(overlapped[first_apart:]),
        "verify_s": verified - start,
        "load_s": loaded - verified,
    }
    if first_apart:
        result["first_blocked_s"] = blocked[0]
        result["first_save_s"] = written[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(ASYNC_MODES), choices=ASYNC_MODES)
    args = parser.parse_args()
    modes = ["off", *[m for m in args.modes if m != "off"]]  # the baseline comes first
    with distributed(torch.device("cpu"), {}) as ctx:
        trainer = build_trainer(args.model, ctx)
        step_s = timed_step(trainer)
        with tempfile.TemporaryDirectory() as work:
            results = {m: measure_mode(trainer, m, args.repeats, Path(work) / m) for m in modes}
        state_bytes = sum(t.numel() * t.element_size() for t in trainer.state.tensors().values())
    sync = results["off"]["save_s"]
    for result in results.values():
        result["blocked_vs_sync_save"] = result["blocked_s"] / sync
    print(
        json.dumps(
            {
                "model": args.model,
                "checkpoint_mib": state_bytes / 2**20,
                "step_s": step_s,
                "repeats": args.repeats,
                "modes": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":  # the process mode's checkpoint process re-imports this module
    main()
