"""The one error type for bad recipes, shared by every subsystem that checks its own section."""

from __future__ import annotations

from typing import Any


class RecipeError(ValueError):
    """A recipe value that cannot work. The message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"recipe key '{key}' = {value!r}: {allowed}")


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise RecipeError for `key` unless `condition` holds."""
    if not condition:
        raise RecipeError(key, value, allowed)


def require_choice(key: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    require(value in choices, key, value, f"must be one of {', '.join(map(str, choices))}")
