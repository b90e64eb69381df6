"""The trainer's own cost per step, outside the model: a model of near-zero cost trained by
`birkhoff train` (in process, the real loader, metrics, checkpoints off) against the same
model's bare loop (forward, backward, AdamW on one pre-built batch), both measured in this
run; the difference is the trainer's overhead, shown as a share of a `tiny_dense` step
trained the same way. Prints one JSON object.

    python benchmarks/trainer_overhead.py --steps 30
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

from birkhoff.launch.recipe import load_recipe, recipe_to_dict
from birkhoff.model import build_model
from birkhoff.train import run_rank

# One layer of width 8: its forward, backward and AdamW take about a millisecond.
NEAR_ZERO = [
    "model=tiny_dense",
    "model.hidden_size=8",
    "model.num_layers=1",
    "model.num_heads=1",
    "model.num_kv_heads=1",
    "model.ffn_hidden_size=8",
    "model.engram.layers=[]",
]
COMMON = ["backend=cpu", "logging.console=plain", "checkpoint.every=0", "train.eval_batches=1"]


def recipe(overrides: list[str]):
    with initialize_config_module(config_module="birkhoff.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=[*COMMON, *overrides])
    return load_recipe(cfg, env={})[0]


def trained_step_seconds(overrides: list[str], steps: int) -> float:
    """Median step_time_s of `birkhoff train` over the steps after the first 3."""
    run = recipe([*overrides, f"train.steps={steps}", "optim.warmup_steps=1"])
    with tempfile.TemporaryDirectory() as tmp:
        run_rank(recipe_to_dict(run), tmp)
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
    times = [json.loads(line)["step_time_s"] for line in lines if '"loss"' in line]
    return statistics.median(times[3:])


def bare_step_seconds(overrides: list[str], steps: int) -> float:
    """Median seconds of forward, backward and AdamW alone, on one batch of the run's shape."""
    run = recipe(overrides)
    net = build_model(run.model, "reference", seed=0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    shape = (run.train.global_batch_size, run.data.seq_len + 1)
    tokens = torch.randint(0, run.model.vocab_size, shape)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        net(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    trained = trained_step_seconds(NEAR_ZERO, args.steps)
    bare = bare_step_seconds(NEAR_ZERO, args.steps)
    dense = trained_step_seconds(["model=tiny_dense"], args.steps)
    overhead = trained - bare
    print(
        json.dumps(
            {
                "near_zero_trained_step_s": trained,
                "near_zero_bare_step_s": bare,
                "trainer_overhead_s": overhead,
                "tiny_dense_trained_step_s": dense,
                "overhead_share_of_tiny_dense_step": overhead / dense,
                "threads": torch.get_num_threads(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
