"""Prepared shards: the on-disk layout, and random access to their packed windows.

A prepared source directory holds, per input file f (in canonical order) and split:
    shards/{f:05d}.{split}.bin        token ids, raw uint16 (uint32 for vocabularies > 65536)
    shards/{f:05d}.{split}.docs.npy   int64 end offset of every document within the .bin
plus `manifest.json` (settings, tokenizer, per-shard token and document counts; written last,
so its presence means the preparation finished) and `checksums.sha256` (sha256sum format).
Each split is one token stream: the shards concatenated in file order. Window i of it is
tokens[i * seq_len : i * seq_len + seq_len + 1], the same windows the streaming path packs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from birkhoff.data.sources import MANIFEST, DataError

CHECKSUMS = "checksums.sha256"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_file(f: int, split: str, kind: str) -> str:
    suffix = "bin" if kind == "tokens" else "docs.npy"
    return f"shards/{f:05d}.{split}.{suffix}"


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{root}: no {MANIFEST}: the preparation did not finish; run `birkhoff data prepare` "
            "again with the same recipe to complete it"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {manifest.get('format_version')} is not "
            f"{FORMAT_VERSION}: prepare the source again with this version"
        )
    return manifest


class PreparedSplit:
    """Memory-mapped token stream of one split of a prepared source, read by window."""

    def __init__(self, root: str | Path, split: str, seq_len: int) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.split, self.seq_len = split, seq_len
        dtype = np.dtype(self.manifest["dtype"])
        self.parts: list[np.ndarray] = []
        for shard in self.manifest["shards"]:
            tokens = shard[f"{split}_tokens"]
            if tokens:
                self.parts.append(
                    self._map(shard_file(shard["file"], split, "tokens"), dtype, tokens)
                )
        sizes = np.array([len(part) for part in self.parts], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(sizes)))
        self.num_tokens = int(self.starts[-1])
        self.num_windows = max(0, (self.num_tokens - 1) // seq_len)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its memory maps (which would pickle as copies); reopened on load."""
        return {"root": self.root, "split": self.split, "seq_len": self.seq_len}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["split"], state["seq_len"])

    @property
    def tokenizer(self) -> dict[str, str]:
        return self.manifest["tokenizer"]

    def window(self, index: int) -> np.ndarray:
        """Window `index` (seq_len + 1 tokens, int64), read across shard boundaries."""
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} of {self.num_windows} in {self.root}")
        start = index * self.seq_len
        stop = start + self.seq_len + 1
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            offset = start - self.starts[first]
            take = min(stop - start, len(self.parts[first]) - offset)
            pieces.append(self.parts[first][offset : offset + take])
            start += take
            first += 1
        return np.concatenate(pieces).astype(np.int64)

    def _map(self, name: str, dtype: np.dtype, expected: int) -> np.ndarray:
        path = self.root / name
        size = path.stat().st_size if path.is_file() else -1
        if size != expected * dtype.itemsize:
            raise DataError(
                f"{path}: {size} bytes, the manifest says {expected * dtype.itemsize}: the shard "
                "is missing or damaged; run `birkhoff data verify` and prepare again"
            )
        return np.memmap(path, dtype=dtype, mode="r")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(root: str | Path) -> int:
    """Check every file listed in checksums.sha256; returns how many. DataError on a mismatch."""
    root = Path(root)
    read_manifest(root)
    listing = root / CHECKSUMS
    if not listing.is_file():
        raise DataError(f"{listing}: missing; prepare the source again")
    checked = 0
    for line in listing.read_text().splitlines():
        expected, name = line.split(maxsplit=1)
        path = root / name
        if not path.is_file():
            raise DataError(f"{path}: listed in {CHECKSUMS} but missing")
        if sha256_file(path) != expected:
            raise DataError(f"{path}: checksum mismatch: the file is damaged; prepare again")
        checked += 1
    return checked
