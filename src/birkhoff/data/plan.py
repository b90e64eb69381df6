"""Before any rank starts: resolve every source and settle the tokenizer (`open_data`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec

from birkhoff.data.config import DataConfig
from birkhoff.data.documents import TRAIN, SplitSpec, StreamPosition, rank_records
from birkhoff.data.shards import read_manifest
from birkhoff.data.sources import DataError, ResolvedSource, resolve_source
from birkhoff.data.tokenizer import (
    SENTENCEPIECE,
    SentencePieceTokenizer,
    Tokenizer,
    cached_model_path,
    describe_identity,
    identity_kind,
    load_tokenizer,
    same_tokenizer,
    train_tokenizer,
)
from birkhoff.errors import require
from birkhoff.machine_cache import machine_cache_dir


@dataclass
class DataPlan:
    """The resolved sources of a recipe and the tokenizer every one of them is read with."""

    config: DataConfig
    sources: list[ResolvedSource]
    tokenizer: Tokenizer
    # Held-out windows by count, read once: the launcher checks them, then a one-process
    # run trains with the same plan (see loader.heldout_windows).
    heldout: dict[int, object] = field(default_factory=dict, repr=False, compare=False)
    heldout_sources: list[ResolvedSource] = field(default_factory=list)

    @property
    def empty_files(self) -> int:
        """Files dropped before reading (data.on_bad_record=skip): empty ones, and not text."""
        return sum(len(source.dropped_files) for source in self.sources)


def cache_dir(cfg: DataConfig) -> Path:
    """`data.cache_dir`, else the machine's cache (`machine_cache_dir`)."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else machine_cache_dir()


def resolve_sources(cfg: DataConfig) -> list[ResolvedSource]:
    skip_bad = cfg.on_bad_record == "skip"
    return [resolve_source(source, skip_bad) for source in cfg.sources]


def open_data(cfg: DataConfig) -> DataPlan:
    """Resolve the sources and load (or train and cache) the tokenizer; DataError/RecipeError
    name the bad source or key. Prepared sources must have been made with that tokenizer."""
    sources = resolve_sources(cfg)
    tokenizer = _tokenizer(cfg, sources)
    for index, source in enumerate(sources):
        if source.format == "prepared":
            check_prepared_tokenizer(source, tokenizer, index)
    heldout_sources = [resolve_source(s, cfg.on_bad_record == "skip") for s in cfg.heldout_sources]
    check_no_overlap(sources, heldout_sources)
    for index, source in enumerate(heldout_sources):
        if source.format == "prepared":
            check_prepared_tokenizer(source, tokenizer, index, "data.heldout_sources")
    return DataPlan(cfg, sources, tokenizer, heldout_sources=heldout_sources)


def _read_files(source: ResolvedSource) -> list[str]:
    """The files a source's tokens come from: a prepared source's directory and the raw files
    it was prepared from (its manifest's list)."""
    if source.format != "prepared":
        return list(source.files)
    return [*source.files, *read_manifest(Path(source.files[0]))["files"]]


def check_no_overlap(sources: list[ResolvedSource], heldout: list[ResolvedSource]) -> None:
    """No file is both trained on and held out (compared as resolved, absolute paths; a
    prepared source by its directory and the files it was prepared from)."""
    trained = {path: i for i, source in enumerate(sources) for path in _read_files(source)}
    for index, source in enumerate(heldout):
        for path in _read_files(source):
            if path in trained:
                raise DataError(
                    f"data.heldout_sources.{index}: {path} is also in data.sources."
                    f"{trained[path]}: held-out data must not be trained on; remove it from one"
                )


def check_prepared_tokenizer(
    source: ResolvedSource, tokenizer: Tokenizer, index: int, key: str = "data.sources"
) -> None:
    used = read_manifest(Path(source.files[0]))["tokenizer"]
    if not same_tokenizer(used, tokenizer.identity()):
        raise DataError(
            f"{key}.{index}: {source.config.path} was prepared with tokenizer "
            f"{describe_identity(used)}, this run uses {describe_identity(tokenizer.identity())}: "
            "prepare it again, or set data.tokenizer.kind and data.tokenizer.path to the ones "
            "it was prepared with"
        )


def training_texts(cfg: DataConfig, sources: list[ResolvedSource]) -> Iterator[str]:
    """The training split of every raw source in canonical order (what a tokenizer learns)."""
    for index, source in enumerate(sources):
        if source.format == "prepared":
            continue
        spec = SplitSpec(TRAIN, cfg.train_split_period, cfg.split_seed, 0, index, shuffle=False)
        for item in rank_records(source, spec, StreamPosition(), epochs=1):
            if item.record.text:
                yield item.record.text


def text_fingerprint(cfg: DataConfig, sources: list[ResolvedSource]) -> str:
    """Identifies the training text without reading it: sources, files, sizes, mtimes, split."""
    digest = hashlib.sha256()
    digest.update(json.dumps([cfg.heldout_period, cfg.split_seed]).encode())
    if cfg.heldout_sources:  # the sources are then trained on whole: other text
        digest.update(b"whole sources")
    for source in sources:
        digest.update(json.dumps(asdict(source.config), sort_keys=True).encode())
        for path in source.files:
            fs, root = fsspec.core.url_to_fs(path)
            info = fs.info(root)
            stamp = [Path(root).name, info.get("size"), str(info.get("mtime", ""))]
            digest.update(json.dumps(stamp).encode())
    return digest.hexdigest()


def _tokenizer(cfg: DataConfig, sources: list[ResolvedSource]) -> Tokenizer:
    if cfg.tokenizer.path is not None or cfg.tokenizer.kind != SENTENCEPIECE:
        return load_tokenizer(cfg.tokenizer)  # hf: never trained, so a path is required
    prepared = [s for s in sources if s.format == "prepared"]
    if prepared:  # read everything with the tokenizer the shards were made with
        used = read_manifest(Path(prepared[0].files[0]))["tokenizer"]
        require(
            identity_kind(used) == SENTENCEPIECE,
            "data.tokenizer.kind",
            cfg.tokenizer.kind,
            f"{prepared[0].config.path} was prepared with tokenizer {describe_identity(used)}: "
            f"set data.tokenizer.kind={identity_kind(used)} data.tokenizer.path={used['path']}",
        )
        return SentencePieceTokenizer(used["path"])
    model_path = cached_model_path(cfg.tokenizer, text_fingerprint(cfg, sources), cache_dir(cfg))
    if model_path.is_file():
        return SentencePieceTokenizer(model_path)
    return train_tokenizer(cfg.tokenizer, training_texts(cfg, sources), model_path)
