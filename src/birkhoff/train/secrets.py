"""Secrets live in the environment only; anything written or logged is scrubbed of their values."""

from __future__ import annotations

import os
from typing import Any

SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
REDACTED = "<redacted>"


def redact(value: Any) -> Any:
    """A copy of a nested dict/list structure with every secret's value replaced."""
    secrets = [os.environ[name] for name in SECRET_ENV_VARS if os.environ.get(name)]
    return _scrub(value, secrets)


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        return {key: _scrub(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(item, secrets) for item in value]
    if isinstance(value, str) and any(secret in value for secret in secrets):
        return REDACTED
    return value
