"""Training-loader throughput against what the trainer consumes, in tokens/s on this machine.

Loader: the `tiny` recipe's batches (train.global_batch_size x data.seq_len) from TrainLoader as
training runs it (Engram hashes included), from the STREAMING source (shakespeare, tokenized on
the fly) and from PREPARED shards (`birkhoff data prepare` into a temp dir). The first --warmup
batches (worker start) are not timed, the next --batches are: keep them at ~1000 or more, since a
streaming worker tokenizes ~1 MB chunks ahead and a short run only drains the first one.
Trainer: forward + backward + clip + AdamW of each model on a loader-built batch of the same
shape (1 warm-up step, then --steps timed). Prints one JSON object: tokens/s of both, and per
(path, model) the ratio loader / trainer with `at_least_10x` (the target).

    python benchmarks/loader_throughput.py --batches 1000 --steps 2 --models tiny small
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from birkhoff.data import (
    BatchBuilder,
    DataPlan,
    EngramHasher,
    Layout,
    TrainLoader,
    heldout_windows,
    open_data,
)
from birkhoff.data.commands import prepare_sources
from birkhoff.data.compression import tokenizer_compression
from birkhoff.launch.recipe import Recipe, load_recipe
from birkhoff.model import build_model
from birkhoff.model.budget import apply_sparse_budget


def recipe_for(overrides: list[str]) -> Recipe:
    with initialize_config_module(config_module="birkhoff.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=["backend=cpu", *overrides])
    return load_recipe(cfg, os.environ)[0]


def batch_builder(recipe: Recipe, plan: DataPlan) -> BatchBuilder:
    """What the trainer gives its loader: document positions if asked, Engram hashes."""
    hasher = None
    sized = apply_sparse_budget(recipe.model)
    if recipe.data.engram_in_loader and sized.engram.layers:
        compression = tokenizer_compression(plan.tokenizer)
        hasher = EngramHasher(sized, compression, plan.tokenizer.pad_id)
    return BatchBuilder(plan.tokenizer.eos_id, recipe.data.document_mask, hasher)


def time_loader(overrides: list[str], warmup: int, batches: int) -> dict:
    recipe = recipe_for(overrides)
    plan, train = open_data(recipe.data), recipe.train
    layout = Layout(train.global_batch_size, train.micro_batch_size, 0, 1, train.seed)
    loader = TrainLoader(plan, layout, batch_builder(recipe, plan))
    try:
        for _ in range(warmup):
            loader.next_batch()
        start = time.perf_counter()
        for _ in range(batches):
            loader.next_batch()
        seconds = time.perf_counter() - start
    finally:
        loader.close()
    tokens = batches * train.global_batch_size * recipe.data.seq_len
    return {"workers": recipe.data.num_workers, "tokens": tokens, "tokens_per_s": tokens / seconds}


def prepare(overrides: list[str], output_dir: str) -> list[str]:
    """Prepared-shard overrides: the recipe's sources written under output_dir."""
    recipe = recipe_for([*overrides, f"data.prepare.output_dir={output_dir}"])
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON
        outputs = prepare_sources(recipe.data, show=False)
    listed = ",".join(f"{{path:{out},weight:1.0}}" for out in outputs)
    return [*overrides, f"data.sources=[{listed}]"]


def time_trainer(model: str, steps: int) -> dict:
    recipe = recipe_for([f"model={model}"])
    plan, train = open_data(recipe.data), recipe.train
    batch = batch_builder(recipe, plan)(heldout_windows(plan, train.global_batch_size))
    torch.manual_seed(train.seed)
    compression = tokenizer_compression(plan.tokenizer)
    net = build_model(recipe.model, "reference", compression, plan.tokenizer.pad_id)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    net.train()

    def step() -> None:
        net(batch.inputs, batch.targets, **batch.model_kwargs()).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - start) / steps
    tokens = train.global_batch_size * recipe.data.seq_len
    return {"tokens_per_step": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s}


def ratios(loader: dict, trainer: dict) -> dict:
    return {
        path: {
            model: {
                "ratio": got["tokens_per_s"] / need["tokens_per_s"],
                "at_least_10x": got["tokens_per_s"] >= 10 * need["tokens_per_s"],
            }
            for model, need in trainer.items()
        }
        for path, got in loader.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000, help="timed loader batches per path")
    parser.add_argument("--warmup", type=int, default=5, help="untimed loader batches first")
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers")
    parser.add_argument("--steps", type=int, default=3, help="timed trainer steps per model")
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--cache-dir", help="tokenizer cache (default: a fresh temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="birkhoff-loader-bench-") as tmp:
        os.environ["BIRKHOFF_CACHE_DIR"] = args.cache_dir or str(Path(tmp) / "cache")
        base = ["model=tiny", f"data.num_workers={args.workers}"]
        loader = {"streaming": time_loader(base, args.warmup, args.batches)}
        prepared = prepare(base, str(Path(tmp) / "prepared"))
        loader["prepared"] = time_loader(prepared, args.warmup, args.batches)
        trainer = {m: time_trainer(m, args.steps) for m in args.models}
    report = {
        "benchmark": "loader_throughput",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "timed": {"loader_batches": args.batches, "trainer_steps": args.steps},
        "loader": loader,
        "trainer": trainer,
        "loader_over_trainer": ratios(loader, trainer),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
