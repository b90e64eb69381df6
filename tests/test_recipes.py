import dataclasses
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from birkhoff.launch.recipe import Recipe, load_recipe, typed_recipe
from conftest import compose_recipe


def schema_keys(node=Recipe, prefix=""):
    keys = set()
    for field in dataclasses.fields(node):
        value = (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        )
        if dataclasses.is_dataclass(value):
            keys |= schema_keys(type(value), f"{prefix}{field.name}.")
        else:
            keys.add(prefix + field.name)
    return keys


def yaml_keys(cfg, prefix=""):
    keys = set()
    for key, value in cfg.items():
        if OmegaConf.is_dict(value):
            keys |= yaml_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


def test_default_recipe_composes_validates_and_matches_the_schema():
    cfg = compose_recipe()
    assert yaml_keys(cfg) == schema_keys(), "recipes/ and the dataclass schema have drifted"
    recipe, topology = load_recipe(cfg, env={})
    assert recipe.model.residual.mode == "mhc" and recipe.model.moe.num_experts > 0
    assert recipe.model.vocab_size == recipe.data.tokenizer.vocab_size  # interpolated
    assert topology.world_size == 1


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (["model=small"], lambda r: r.model.hidden_size == 768 and r.model.num_layers == 12),
        (["optim.lr=3e-4"], lambda r: r.optim.lr == 3e-4),
        (["train.steps=100"], lambda r: r.train.steps == 100),
        (["optim=adamw_wsd"], lambda r: r.optim.schedule == "wsd" and r.optim.lr == 3e-3),
        ([], lambda r: r.optim.name == "muon_v4" and r.optim.lr == 3e-3),  # V4's by default
        (["optim=adamw_cosine"], lambda r: r.optim.name == "adamw"),
        (["logging=wandb"], lambda r: r.logging.wandb.enabled and r.logging.jsonl),
        (["logging.wandb.enabled=true"], lambda r: r.logging.wandb.enabled),
        (["backend=cpu"], lambda r: r.backend.device == "cpu"),
        (["data.tokenizer.vocab_size=1024"], lambda r: r.model.vocab_size == 1024),
    ],
)
def test_overrides_apply(overrides, check):
    recipe, _ = load_recipe(compose_recipe(overrides), env={})
    assert check(recipe)


def test_every_group_option_composes_and_validates():
    from importlib.resources import files

    for group in ("model", "data", "optim", "train", "parallel", "backend", "logging"):
        for entry in (files("birkhoff.recipes") / group).iterdir():
            name = entry.name.removesuffix(".yaml")
            if name in LAYOUT_RECIPES:  # a whole cluster's layout, for its model
                recipe = typed_recipe(
                    compose_recipe([f"model={LAYOUT_RECIPES[name]}", f"{group}={name}"])
                )
                recipe.validate(recipe.launch.nnodes * recipe.launch.nproc_per_node)
            elif entry.name.endswith(".yaml"):
                load_recipe(compose_recipe([f"{group}={name}"]), env={})


# parallel= layout recipes (they set launch, batch and cluster too) -> the model they are for
LAYOUT_RECIPES = {
    "v4_flash_256xh100": "deepseek_v4_flash",
    "v4_pro_512xh200": "deepseek_v4_pro",
    "engram_27b_32xh100": "engram_27b",
}


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "birkhoff.launch.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_the_composed_recipe(tmp_path):
    result = run_cli("train", "--cfg", "job", "model=small", "optim.lr=3e-4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.model.hidden_size == 768 and printed.optim.lr == 3e-4
    assert not any(tmp_path.iterdir()), "--cfg job must not create a run dir"


def test_cli_without_arguments_prints_usage():
    result = subprocess.run(
        [sys.executable, "-m", "birkhoff.launch.cli"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "birkhoff train" in result.stdout


def _field_paths(cls, prefix: str = "") -> set[str]:
    """Every field of a config dataclass, nested ones as dotted paths."""
    paths = set()
    for field in dataclasses.fields(cls):
        kind = field.type if isinstance(field.type, type) else None
        default = field.default_factory() if callable(field.default_factory) else None
        if dataclasses.is_dataclass(default):
            paths |= _field_paths(type(default), f"{prefix}{field.name}.")
        elif kind is not None and dataclasses.is_dataclass(kind):
            paths |= _field_paths(kind, f"{prefix}{field.name}.")
        else:
            paths.add(prefix + field.name)
    return paths


ABSENT = object()


def test_every_model_recipe_takes_every_model_key():
    """A `model.X=...` override works whatever the model recipe (Hydra refuses a key the
    composed recipe lacks): every model recipe holds every field of ModelConfig."""
    from importlib.resources import files

    from birkhoff.model.config import ModelConfig

    wanted = _field_paths(ModelConfig)
    for entry in (files("birkhoff.recipes") / "model").iterdir():
        name = entry.name.removesuffix(".yaml")
        model = compose_recipe([f"model={name}"]).model
        held = {p for p in wanted if OmegaConf.select(model, p, default=ABSENT) is not ABSENT}
        assert held == wanted, (name, sorted(wanted - held))
