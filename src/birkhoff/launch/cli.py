"""`birkhoff` CLI; `birkhoff train [overrides]` is a Hydra app over the packaged recipes."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from birkhoff.data import DataConfig, DataError, open_data
from birkhoff.data.commands import prepare_sources, write_tokenizer_model
from birkhoff.data.shards import verify_checksums
from birkhoff.errors import RecipeError, require
from birkhoff.launch.ckpt_command import ckpt_command
from birkhoff.launch.recipe import load_recipe, recipe_to_dict
from birkhoff.launch.spawn import launch_ranks
from birkhoff.launch.topology import Topology
from birkhoff.train import run_rank
from birkhoff.train.entry import check_data
from birkhoff.train.run_files import refuse_used_run_dir

USAGE = """usage: birkhoff <command> [args]

commands:
  train [overrides...]   train from the packaged recipes (Hydra): e.g.
                         birkhoff train model=small optim.lr=3e-4 train.steps=100
                         birkhoff train --multirun optim.lr=1e-3,3e-3
                         birkhoff train --cfg job        (print the composed recipe)
                         birkhoff train --help           (Hydra's help: groups and options)
  data tokenizer [overrides...]
                         train a sentencepiece model on the recipe's sources and write it
                         to data.tokenizer.path (default: the cache)
  data prepare [overrides...]
                         tokenize every source once into shards under
                         data.prepare.output_dir (resumes an interrupted run)
  data verify DIR        check a prepared directory against its checksums
  ckpt inspect PATH [--json]
                         a checkpoint's step, tokens, layout, tokenizer, completeness and
                         tensors (shapes, dtypes, sizes); the recipe with --json
  ckpt export PATH --to safetensors [--out DIR] [--dtype bfloat16] [--max-shard-gib 5]
                         the model weights, consolidated from every rank's shards, as
                         safetensors files plus config.json (default DIR: PATH-safetensors)
"""
RECIPES = "pkg://birkhoff.recipes"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "data":
        return data_command(rest)
    if command == "ckpt":
        return ckpt_command(rest)
    if command == "train":
        sys.argv = ["birkhoff train", *rest]  # Hydra parses sys.argv
        hydra.main(version_base=None, config_path=RECIPES, config_name="config")(train_job)()
        return 0
    print(f"birkhoff: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def data_command(args: list[str]) -> int:
    """`birkhoff data tokenizer|prepare|verify`: errors are one line and exit code 2."""
    try:
        if args[:1] == ["verify"] and len(args) == 2:
            count = verify_checksums(args[1])
            print(f"birkhoff: {args[1]}: {count} files match their checksums")
            return 0
        if args[:1] == ["tokenizer"]:
            print(f"birkhoff: tokenizer written to {write_tokenizer_model(_data_recipe(args[1:]))}")
            return 0
        if args[:1] == ["prepare"]:
            prepare_sources(_data_recipe(args[1:]), show=sys.stdout.isatty())
            return 0
    except (RecipeError, DataError) as err:
        print(f"birkhoff: {err}", file=sys.stderr)
        return 2
    print(
        f"birkhoff: usage: birkhoff data tokenizer|prepare [overrides] | verify DIR\n\n{USAGE}",
        file=sys.stderr,
    )
    return 2


def _data_recipe(overrides: list[str]) -> DataConfig:
    """The recipe's `data` section, composed and validated like `birkhoff train` does."""
    with initialize_config_module(config_module="birkhoff.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    recipe, _ = load_recipe(cfg, os.environ)
    return recipe.data


def train_job(cfg: DictConfig) -> None:
    """One Hydra job: validate, prepare the data once, then run or start the ranks."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        recipe, topology = load_recipe(cfg, os.environ)
        check_run_dir(run_dir, topology, resuming=bool(recipe.train.resume))
        data = open_data(recipe.data)
        check_data(data, recipe)
    except (RecipeError, DataError) as err:
        _remove_if_empty(run_dir)
        print(f"birkhoff: {err}", file=sys.stderr)
        sys.exit(2)
    print(
        f"birkhoff: {topology.world_size} rank(s) on {topology.nnodes} node(s), run dir {run_dir}",
        flush=True,
    )
    try:
        if topology.world_size == 1:
            run_rank(recipe_to_dict(recipe), str(run_dir), data)
        else:
            status = launch_ranks(topology, recipe_to_dict(recipe), str(run_dir))
            if status:
                sys.exit(status)
    finally:
        _remove_if_empty(run_dir)  # on a node without global rank 0 nothing was written


def check_run_dir(run_dir: Path, topology: Topology, resuming: bool = False) -> None:
    """Nodes must share one run dir; a single node refuses a used one before starting ranks
    (unless the run resumes: it continues the run dir's files).

    Across nodes only global rank 0 checks, after the rendezvous: the rendezvous decides which
    node hosts it, and the other nodes may see its files appear at any time.
    """
    if topology.nnodes == 1:
        if not resuming:
            refuse_used_run_dir(run_dir)
        return
    given = any(item.startswith("hydra.run.dir=") for item in HydraConfig.get().overrides.hydra)
    require(
        given or "SLURM_JOB_ID" in os.environ,
        "hydra.run.dir",
        str(run_dir),
        f"a {topology.nnodes}-node run needs one run dir shared by every node: pass "
        "hydra.run.dir=/shared/path on each node (inside SLURM it defaults to the job id)",
    )


def _remove_if_empty(run_dir: Path) -> None:
    """Hydra creates the run dir before the job runs; a job that wrote nothing leaves nothing."""
    with contextlib.suppress(OSError):
        run_dir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
