"""A composed recipe -> typed, validated `Recipe`, or one RecipeError naming key, value and fix."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from birkhoff.errors import RecipeError, require
from birkhoff.launch.config import ClusterConfig, LaunchConfig
from birkhoff.launch.topology import Topology, resolve_topology
from birkhoff.train.recipe import TrainRecipe


@dataclass
class Recipe(TrainRecipe):
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        hang, collective = self.train.hang_timeout_s, self.launch.collective_timeout_s
        # A collective that times out first fails the run with no stacks to show.
        require(
            hang is None or collective is None or hang < collective,
            "train.hang_timeout_s",
            hang,
            f"must be < launch.collective_timeout_s={collective}, so the hang watchdog "
            "dumps every rank's stacks before a collective times out",
        )


def compose_recipe(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """The packaged recipes composed with `overrides`, as `birkhoff train` would (Hydra's own
    section too, with `with_hydra`)."""
    with initialize_config_module(config_module="birkhoff.recipes", version_base=None):
        return compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)


def load_recipe(
    cfg: DictConfig | Mapping[str, Any], env: Mapping[str, str]
) -> tuple[Recipe, Topology]:
    """Type-check `cfg` against the schema, then check every value; nothing runs before this."""
    recipe = typed_recipe(cfg)
    _check_numbers(recipe)
    recipe.launch.validate()
    topology = resolve_topology(recipe.launch, env)
    recipe.validate(topology.world_size)
    return recipe, topology


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)


def typed_recipe(cfg: DictConfig | Mapping[str, Any]) -> Recipe:
    """`cfg` checked against the schema (unknown keys, types); values are checked later."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Recipe), cfg)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        raise RecipeError(key, _value_at(cfg, key), f"unknown key; {_allowed_keys(key)}") from None
    except MissingMandatoryValue as err:
        raise RecipeError(err.full_key, "???", "is required: set it on the command line") from None
    except OmegaConfBaseException as err:
        reason = str(err.msg).splitlines()[0] if err.msg else type(err).__name__
        raise RecipeError(err.full_key, err.value, reason) from None


def _check_numbers(node: Any, prefix: str = "") -> None:
    """No section's checks expect inf, nan or integers beyond float precision (1e23 given for
    an integer key): refuse them everywhere, before the sections look at their values."""
    for item in dataclasses.fields(node):
        key, value = f"{prefix}{item.name}", getattr(node, item.name)
        if dataclasses.is_dataclass(value):
            _check_numbers(value, f"{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(key, value, "must be a finite number")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
            raise RecipeError(key, value, f"is too large (the limit is 2**53 = {2**53})")


def _allowed_keys(full_key: str) -> str:
    """The keys the schema has beside an unknown one, e.g. 'optim allows: lr, ...'."""
    parent_path = full_key.rpartition(".")[0]
    node: Any = Recipe
    for part in filter(None, parent_path.split(".")):
        node = typing.get_type_hints(node).get(part)
        if not dataclasses.is_dataclass(node):
            return "check the spelling against `birkhoff train --cfg job`"
    names = ", ".join(f.name for f in dataclasses.fields(node))
    return f"{parent_path or 'the recipe'} allows: {names}"


def _value_at(cfg: DictConfig | Mapping[str, Any], full_key: str) -> Any:
    node: Any = cfg
    for part in full_key.split("."):
        if not isinstance(node, Mapping | DictConfig) or part not in node:
            return None
        node = node[part]
    return OmegaConf.to_container(node) if isinstance(node, DictConfig) else node
