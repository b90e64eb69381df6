"""Secrets live in the environment only. The launching process turns the recipe into a public
one (`scrub_recipe`), the only recipe ever written or logged; printed errors are scrubbed too
(`scrub_text`, given the composed recipe or, in a rank, the public one).

A secret is the value of a known secret variable, of any variable named like one (`*_TOKEN`,
`*_KEY`, `*_SECRET`, `*_PASSWORD`), and of every variable the recipe reads with `${oc.env:NAME}`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from omegaconf import Container, DictConfig, ListConfig, OmegaConf

SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD")
REDACTED = "<redacted>"
# Shorter values cannot be real secrets, and replacing them would mangle every message.
MIN_SECRET_CHARS = 4
_ENV_NAME = re.compile(r"oc\.env:\s*['\"]?([^,'\"}\s]+)")

KeyPath = tuple[str | int, ...]
Source = Container | Mapping[str, Any] | None  # the recipe that names the oc.env variables


def scrub_recipe(
    recipe: Mapping[str, Any],
    cfg: Container | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The public copy of a resolved recipe: values that `cfg` (the composed, unresolved
    recipe) reads with `${oc.env:...}` are written back as that text, and then every value that
    contains a secret becomes `<redacted>`. `recipe` itself is not modified."""
    public = _copy(recipe)
    for path, text in env_interpolations(cfg).items():
        _set(public, path, text)
    return _redact(public, secret_values(cfg, env))


def scrub_text(text: str, recipe: Source = None, env: Mapping[str, str] | None = None) -> str:
    """`text` (an error message, say) with every secret's value replaced by `<redacted>`.
    `recipe`: the composed recipe or a public one, which name the variables read with oc.env."""
    for secret in secret_values(recipe, env):
        text = text.replace(secret, REDACTED)
    return text


def secret_values(recipe: Source = None, env: Mapping[str, str] | None = None) -> list[str]:
    """The values of the secret variables set in `env` (default: this process's), longest
    first so that no secret is left half replaced inside a longer one."""
    env = os.environ if env is None else env
    if recipe is None or isinstance(recipe, Container):
        texts = list(env_interpolations(recipe).values())
    else:  # a public recipe holds the interpolation texts as plain strings
        texts = list(_strings(recipe))
    referenced = {name for text in texts for name in env_names(text)}
    names = [name for name in env if _is_secret_name(name) or name in referenced]
    values = {env[name] for name in names if len(env[name]) >= MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def env_interpolations(cfg: Container | None) -> dict[KeyPath, str]:
    """Every value of `cfg` that reads the environment, as path -> its interpolation text."""
    found: dict[KeyPath, str] = {}
    if cfg is None:
        return found
    keys: list[Any] = list(cfg.keys()) if isinstance(cfg, DictConfig) else list(range(len(cfg)))
    for key in keys:
        node = cfg._get_node(key)
        if OmegaConf.is_interpolation(cfg, key):
            text = str(node._value())
            if env_names(text):
                found[(key,)] = text
        elif isinstance(node, DictConfig | ListConfig) and not node._is_none():
            found.update({(key, *path): text for path, text in env_interpolations(node).items()})
    return found


def env_names(text: str) -> list[str]:
    """The variables an interpolation text reads: `${oc.env:A,${oc.env:B}}` -> [A, B]."""
    return _ENV_NAME.findall(text)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _is_secret_name(name: str) -> bool:
    return name in SECRET_ENV_VARS or name.upper().endswith(SECRET_SUFFIXES)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(item) for item in value]
    return value


def _set(tree: Any, path: KeyPath, value: str) -> None:
    """Set `tree[path]` when that path exists (the typed recipe has every composed key)."""
    *parents, last = path
    for key in parents:
        if not _has(tree, key):
            return
        tree = tree[key]
    if _has(tree, last):
        tree[last] = value


def _has(tree: Any, key: str | int) -> bool:
    if isinstance(tree, dict):
        return key in tree
    return isinstance(tree, list) and isinstance(key, int) and 0 <= key < len(tree)


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        return {key: _redact(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact(item, secrets) for item in value]
    # Numbers too: a secret made of digits must not come back through an integer key.
    shown = value if isinstance(value, str) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        shown = str(value)
    if shown is not None and any(secret in shown for secret in secrets):
        return REDACTED
    return value


class ScrubFilter(logging.Filter):
    """Scrubs log records, for Hydra's logging (a sweep logs each job's command line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = scrub_text(record.getMessage()), ()
        return True
