"""Checksums of a checkpoint's files, so a truncated, corrupted, missing or edited file (the
shards, DCP's .metadata, meta.json, the rank states) is found before anything is loaded, and
so is a file added afterwards. Every rank hashes (and later verifies) its own share of the
files, so the cost is spread like the writing was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from birkhoff.checkpoint.errors import CheckpointError

CHECKSUMS = "checksums.json"
COMPLETE = "COMPLETE"
NOT_HASHED = frozenset({CHECKSUMS, COMPLETE})  # written after the hashing, by rank 0
SUMS_PREFIX = "sums-"  # per-rank partial lists, merged into CHECKSUMS by rank 0


def _all_files(path: Path) -> list[str]:
    return sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file())


def checkpoint_files(path: Path) -> list[str]:
    """The files to checksum, relative to `path`, in the same order on every rank: not the
    per-rank partial lists, nor their temporary files (ranks write them while others list)."""
    partial = (SUMS_PREFIX, f".{SUMS_PREFIX}")
    return [
        name
        for name in _all_files(path)
        if name not in NOT_HASHED and not PurePosixPath(name).name.startswith(partial)
    ]


def my_share(names: list[str], rank: int, world: int) -> list[str]:
    return names[rank::world]


def digest(file: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return {"bytes": file.stat().st_size, "sha256": sha.hexdigest()}


def read_checksums(path: Path) -> dict[str, dict[str, Any]]:
    """The checksums of the checkpoint at `path`; a missing or malformed list is an error."""
    file = path / CHECKSUMS
    try:
        expected = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{file} is missing, so the checkpoint's files cannot be verified; copy the "
            f"checkpoint again whole ({CHECKSUMS} included) or resume from another one"
        ) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} is unreadable ({err}); copy the checkpoint again") from None
    if not (isinstance(expected, dict) and all(_is_entry(k, v) for k, v in expected.items())):
        raise CheckpointError(f"{file} is not a checksum list; copy the checkpoint again")
    return expected


def _is_entry(name: Any, value: Any) -> bool:
    """A relative path inside the checkpoint with its size and sha256."""
    inside = isinstance(name, str) and not PurePosixPath(name).is_absolute()
    inside = inside and ".." not in PurePosixPath(name).parts
    return (
        inside
        and isinstance(value, dict)
        and isinstance(value.get("bytes"), int)
        and isinstance(value.get("sha256"), str)
    )


def problems(path: Path, expected: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """What is wrong with the files `names` of the checkpoint at `path`."""
    found = []
    for name in names:
        file = path / name
        want = expected[name]
        if not file.is_file():
            found.append(f"{file} is missing")
        elif file.stat().st_size < want["bytes"]:
            found.append(f"{file} is truncated: {file.stat().st_size} of {want['bytes']} bytes")
        elif file.stat().st_size > want["bytes"]:
            found.append(
                f"{file} is corrupted: {file.stat().st_size} bytes, {CHECKSUMS} says "
                f"{want['bytes']}"
            )
        elif digest(file)["sha256"] != want["sha256"]:
            found.append(f"{file} is corrupted: its sha256 differs from {CHECKSUMS}")
    return found


def unlisted(path: Path, expected: dict[str, dict[str, Any]]) -> list[str]:
    """Files of the checkpoint at `path` that its checksums do not cover (added later)."""
    return [
        f"{path / name} is not listed in {CHECKSUMS} (added after the checkpoint was saved)"
        for name in _all_files(path)
        if name not in expected and name not in NOT_HASHED
    ]
