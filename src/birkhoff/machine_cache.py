"""The machine's cache directory: what is worth keeping between runs on one machine (tokenizers,
token caches, the measured matmul peak, the cpu backend's built kernels)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "BIRKHOFF_CACHE_DIR"


def machine_cache_dir() -> Path:
    """$BIRKHOFF_CACHE_DIR, else ~/.cache/birkhoff."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/birkhoff").expanduser()
