"""Checksums of a checkpoint's files, so a truncated, corrupted or missing shard is found
before anything is loaded. Every rank hashes (and later verifies) its own share of the files,
so the cost is spread like the writing was."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CHECKSUMS = "checksums.json"
SUMS_PREFIX = "sums-"  # per-rank partial lists, merged into CHECKSUMS by rank 0


def checkpoint_files(path: Path) -> list[str]:
    """The files to checksum, relative to `path`, in the same order on every rank."""
    return sorted(
        str(f.relative_to(path))
        for f in path.rglob("*")
        if f.is_file() and not f.name.startswith(SUMS_PREFIX)
    )


def my_share(names: list[str], rank: int, world: int) -> list[str]:
    return names[rank::world]


def digest(file: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return {"bytes": file.stat().st_size, "sha256": sha.hexdigest()}


def problems(path: Path, expected: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """What is wrong with the files `names` of the checkpoint at `path`."""
    found = []
    for name in names:
        file = path / name
        want = expected[name]
        if not file.is_file():
            found.append(f"{file} is missing")
        elif file.stat().st_size != want["bytes"]:
            found.append(f"{file} is truncated: {file.stat().st_size} of {want['bytes']} bytes")
        elif digest(file)["sha256"] != want["sha256"]:
            found.append(f"{file} is corrupted: its sha256 differs from {CHECKSUMS}")
    return found
