"""`birkhoff data prepare`: tokenize a source once into prepared shards (layout in shards.py).

One work unit per input file, run by a process pool. A unit writes its files through temporary
names and then a `.done.json` marker, so an interrupted preparation resumes by redoing only the
units without a marker. The manifest and checksums are written last.
"""

from __future__ import annotations

import io
import json
import multiprocessing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from birkhoff.atomic import write_bytes_atomic, write_text_atomic
from birkhoff.data.config import DataConfig
from birkhoff.data.documents import HELDOUT, TRAIN, SplitSpec
from birkhoff.data.shards import (
    CHECKSUMS,
    FORMAT_VERSION,
    sha256_file,
    shard_file,
    token_dtype,
)
from birkhoff.data.sources import (
    MANIFEST,
    PREPARE_SETTINGS,
    DataError,
    ResolvedSource,
    describe,
    read_records,
)
from birkhoff.data.tokenizer import Tokenizer, identity_kind

SPLITS = (TRAIN, HELDOUT)


def prepare_source(
    source: ResolvedSource, tokenizer: Tokenizer, cfg: DataConfig, output: Path, show: bool
) -> dict[str, Any]:
    """Prepare one source into `output` (resuming a preparation there); returns the manifest."""
    settings = _settings(source, tokenizer, cfg)
    _claim(output, settings)
    units = [f for f in range(len(source.files)) if not _done(output, f).is_file()]
    jobs = [(source, tokenizer, cfg, output, f) for f in units]
    with _progress(show) as progress:
        task = progress.add_task(f"prepare {source.name}", total=len(source.files))
        progress.advance(task, len(source.files) - len(units))
        workers = min(cfg.prepare.workers, max(1, len(units)))
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_prepare_unit, jobs):
                progress.advance(task)
    return _finish(output, settings, len(source.files))


def _settings(source: ResolvedSource, tokenizer: Tokenizer, cfg: DataConfig) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "source": asdict(source.config),
        "format": source.format,
        "files": list(source.files),
        "tokenizer": tokenizer.identity(),
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "heldout_period": cfg.heldout_period,
        "split_seed": cfg.split_seed,
        "on_bad_record": cfg.on_bad_record,
    }


def _claim(output: Path, settings: dict[str, Any]) -> None:
    """Start, or resume a preparation with the same settings; refuse to mix two."""
    path = output / PREPARE_SETTINGS
    if path.is_file():
        previous = json.loads(path.read_text())
        # Preparations begun before tokenizers had kinds were sentencepiece: resume them.
        previous["tokenizer"] = {
            **previous["tokenizer"],
            "kind": identity_kind(previous["tokenizer"]),
        }
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise DataError(
                f"{output} holds a preparation with other settings ({', '.join(changed)} "
                "differ): use another data.prepare.output_dir, or delete it"
            )
        return
    if output.exists() and any(output.iterdir()):
        raise DataError(f"{output} is not empty and holds no {PREPARE_SETTINGS}: use an empty dir")
    write_text_atomic(path, json.dumps(settings, indent=2))


def _done(output: Path, f: int) -> Path:
    return output / f"shards/{f:05d}.done.json"


def _prepare_unit(job: tuple[ResolvedSource, Tokenizer, DataConfig, Path, int]) -> int:
    source, tokenizer, cfg, output, f = job
    spec = SplitSpec(HELDOUT, cfg.heldout_period, cfg.split_seed, 0, 0, False)
    streams: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    skipped = 0
    for record in read_records(source.files[f], source):
        if record.problem is not None:
            if cfg.on_bad_record != "skip":
                raise DataError(
                    f"{describe(source.files[f], record, source)} "
                    "(fix the file, or set data.on_bad_record=skip)"
                )
            skipped += 1
        elif record.text.strip():
            split = HELDOUT if spec.is_member(f, record.index) else TRAIN
            streams[split].append(tokenizer.encode_document(record.text))
    summary: dict[str, Any] = {"file": f, "skipped": skipped}
    for split, documents in streams.items():
        summary.update(_write_split(output, f, split, documents, tokenizer.vocab_size))
    write_text_atomic(_done(output, f), json.dumps(summary))
    return f


def _write_split(
    output: Path, f: int, split: str, documents: list[np.ndarray], vocab_size: int
) -> dict[str, int]:
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    tokens = np.concatenate(documents) if documents else np.zeros(0, dtype=np.int32)
    stored = tokens.astype(token_dtype(vocab_size)).tobytes()
    write_bytes_atomic(output / shard_file(f, split, "tokens"), stored)
    write_bytes_atomic(output / shard_file(f, split, "docs"), _npy_bytes(np.cumsum(lengths)))
    return {f"{split}_tokens": len(tokens), f"{split}_documents": len(lengths)}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _finish(output: Path, settings: dict[str, Any], num_files: int) -> dict[str, Any]:
    shards = [json.loads(_done(output, f).read_text()) for f in range(num_files)]
    totals = {
        key: sum(shard[key] for shard in shards)
        for key in (
            "train_tokens",
            "heldout_tokens",
            "train_documents",
            "heldout_documents",
            "skipped",
        )
    }
    names = [
        shard_file(f, split, kind)
        for f in range(num_files)
        for split in SPLITS
        for kind in ("tokens", "docs")
    ]
    checksums = "".join(f"{sha256_file(output / name)}  {name}\n" for name in names)
    write_text_atomic(output / CHECKSUMS, checksums)
    manifest = {**settings, "shards": shards, "totals": totals}
    write_text_atomic(output / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show,
    )
