"""`birkhoff` CLI; `birkhoff train [overrides]` is a Hydra app over the packaged recipes."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from birkhoff.atomic import write_text_atomic
from birkhoff.data import prepare_data
from birkhoff.data.corpus import CorpusError
from birkhoff.errors import RecipeError
from birkhoff.launch.recipe import load_recipe, recipe_to_dict
from birkhoff.launch.spawn import launch_ranks
from birkhoff.train import run_rank
from birkhoff.train.entry import check_tokenizer_matches
from birkhoff.train.secrets import redact

USAGE = """usage: birkhoff <command> [args]

commands:
  train [overrides...]   train from the packaged recipes (Hydra): e.g.
                         birkhoff train model=small optim.lr=3e-4 train.steps=100
                         birkhoff train --multirun optim.lr=1e-3,3e-3
                         birkhoff train --cfg job        (print the composed recipe)
                         birkhoff train --help           (Hydra's help: groups and options)
"""
RECIPES = "pkg://birkhoff.recipes"
RECIPE_FILE = "recipe.yaml"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "train":
        sys.argv = ["birkhoff train", *rest]  # Hydra parses sys.argv
        hydra.main(version_base=None, config_path=RECIPES, config_name="config")(train_job)()
        return 0
    print(f"birkhoff: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def train_job(cfg: DictConfig) -> None:
    """One Hydra job: validate, record the recipe, prepare data once, then start the ranks."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        recipe, topology = load_recipe(cfg, os.environ)
        data = prepare_data(recipe.data)
        check_tokenizer_matches(data.tokenizer, recipe.model)
    except (RecipeError, CorpusError) as err:
        _remove_if_empty(run_dir)
        print(f"birkhoff: {err}", file=sys.stderr)
        sys.exit(2)
    recipe_dict = redact(recipe_to_dict(recipe))
    if topology.node_rank == 0:
        write_text_atomic(run_dir / RECIPE_FILE, OmegaConf.to_yaml(recipe_dict))
    print(
        f"birkhoff: {topology.world_size} rank(s) on {topology.nnodes} node(s), run dir {run_dir}",
        flush=True,
    )
    if topology.world_size == 1:
        run_rank(recipe_dict, str(run_dir))
    else:
        launch_ranks(topology, recipe.launch.max_restarts, recipe_dict, str(run_dir))


def _remove_if_empty(run_dir: Path) -> None:
    """Hydra creates the run dir before the job runs; a rejected recipe leaves nothing behind."""
    with contextlib.suppress(OSError):
        run_dir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
