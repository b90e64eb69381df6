"""Secrets never leave the environment: not into run files, wandb, checkpoints or messages."""

import json
import os
import secrets
import subprocess

import pytest
from test_train import cli_command, run_cli

from birkhoff.errors import RecipeError
from birkhoff.launch.recipe import load_recipe, recipe_to_dict
from birkhoff.train.secrets import REDACTED, scrub_recipe, scrub_text
from conftest import compose_recipe

ENV_NAME = "${oc.env:MY_SECRET}"


def two_secrets(monkeypatch) -> tuple[str, str]:
    """A known secret variable and one that is secret only because the recipe reads it."""
    key, mine = f"key-{secrets.token_hex(16)}", f"mine-{secrets.token_hex(16)}"
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("MY_SECRET", mine)
    return key, mine


def test_public_recipe_keeps_env_reads_as_text_and_redacts_secret_values(monkeypatch):
    key, mine = two_secrets(monkeypatch)
    monkeypatch.setenv("SOME_TOKEN", "token-value-123")
    cfg = compose_recipe(
        [
            f"logging.wandb.name={ENV_NAME}",
            f"logging.wandb.tags=[{key},x-token-value-123,plain]",
            "logging.wandb.entity=${oc.env:NOT_SET_ANYWHERE,team}",
        ]
    )
    recipe, _ = load_recipe(cfg, os.environ)
    private = recipe_to_dict(recipe)
    public = scrub_recipe(private, cfg)
    assert private["logging"]["wandb"]["name"] == mine, "training keeps the resolved value"
    assert public["logging"]["wandb"] == {
        **private["logging"]["wandb"],
        "name": ENV_NAME,
        "entity": "${oc.env:NOT_SET_ANYWHERE,team}",
        "tags": [REDACTED, REDACTED, "plain"],
    }
    # A string that holds the value of a variable the recipe reads is a secret too.
    assert scrub_text(f"path /x/{mine}/y", cfg) == f"path /x/{REDACTED}/y"
    assert scrub_text(f"path /x/{mine}/y", public) == f"path /x/{REDACTED}/y"
    assert scrub_text(f"a {key} b") == f"a {REDACTED} b"


def test_a_validation_error_read_through_oc_env_is_scrubbed(monkeypatch):
    _, mine = two_secrets(monkeypatch)
    cfg = compose_recipe([f"logging.wandb.mode={ENV_NAME}"])
    with pytest.raises(RecipeError) as error:
        load_recipe(cfg, os.environ)
    assert mine in str(error.value) and mine not in scrub_text(str(error.value), cfg)


def test_cli_validation_error_prints_redacted_not_the_secret(tmp_path):
    key = f"key-{secrets.token_hex(16)}"
    result = subprocess.run(
        cli_command([f"logging.wandb.mode={key}", f"hydra.run.dir={tmp_path}/run"]),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_API_KEY": key},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"recipe key 'logging.wandb.mode' = '{REDACTED}'" in result.stderr
    assert key not in result.stdout + result.stderr


@pytest.mark.slow
def test_training_with_wandb_writes_no_secret_anywhere(tmp_path):
    """One recipe value holds WANDB_API_KEY verbatim, another reads MY_SECRET with oc.env; no
    file the run, Hydra or wandb writes (checkpoints included) and no output holds either."""
    key, mine = f"key-{secrets.token_hex(16)}", f"mine-{secrets.token_hex(16)}"
    wandb_env = {
        f"WANDB_{name}_DIR": str(tmp_path / f"wandb-{name.lower()}")
        for name in ("CACHE", "CONFIG", "DATA")
    }
    result = run_cli(
        [
            "train.steps=3",
            "checkpoint.every=1",
            "logging=wandb",
            f"logging.wandb.tags=[{key}]",
            f"logging.wandb.name={ENV_NAME}",
            f"hydra.run.dir={tmp_path}/run",
        ],
        tmp_path,
        env={
            "WANDB_API_KEY": key,
            "MY_SECRET": mine,
            "WANDB_DIR": str(tmp_path / "wandb-dir"),
            **wandb_env,
        },
    )
    run_dir = tmp_path / "run"
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].rglob("*.wandb"))
    assert ENV_NAME in (run_dir / "recipe.yaml").read_text()
    meta = json.loads(next(run_dir.glob("checkpoints/step-*/meta.json")).read_text())
    assert meta["recipe"]["logging"]["wandb"]["name"] == ENV_NAME
    assert meta["recipe"]["logging"]["wandb"]["tags"] == [REDACTED]
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".distcp" for path in files)
    for secret in (key, mine):
        assert secret not in result.stdout + result.stderr
        for path in files:
            assert secret.encode() not in path.read_bytes(), path
