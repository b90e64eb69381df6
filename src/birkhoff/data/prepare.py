"""From a `data` recipe section to train and held-out token streams (cached by content)."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from birkhoff.atomic import write_bytes_atomic
from birkhoff.data.config import DataConfig
from birkhoff.data.corpus import CorpusError, Document, corpus_fingerprint, load_documents
from birkhoff.data.tokenizer import Tokenizer, load_or_train_tokenizer

CACHE_ENV = "BIRKHOFF_CACHE_DIR"


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train_tokens: np.ndarray
    heldout_tokens: np.ndarray


def cache_dir(cfg: DataConfig) -> Path:
    """`data.cache_dir`, else $BIRKHOFF_CACHE_DIR, else ~/.cache/birkhoff."""
    configured = cfg.cache_dir or os.environ.get(CACHE_ENV)
    return Path(configured or "~/.cache/birkhoff").expanduser()


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Load the corpus, split it by document, get the tokenizer and both token streams."""
    documents = load_documents(cfg.corpus)
    train_docs, heldout_docs = split_documents(documents, cfg.heldout_fraction, cfg.split_seed)
    root = cache_dir(cfg)
    tokenizer = load_or_train_tokenizer(
        cfg.tokenizer, train_docs, corpus_fingerprint(train_docs), root
    )
    key = f"{tokenizer.sha256()[:16]}-{cfg.split_seed}-{cfg.heldout_fraction}"
    train = _cached_tokens(tokenizer, train_docs, root / "tokens" / f"{key}-train.npy")
    heldout = _cached_tokens(tokenizer, heldout_docs, root / "tokens" / f"{key}-heldout.npy")
    return PreparedData(tokenizer, train, heldout)


def split_documents(
    documents: list[Document], heldout_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents (a seeded choice); a one-document corpus is split by its lines."""
    if len(documents) == 1:
        return _split_single(documents[0], heldout_fraction)
    order = np.random.default_rng(seed).permutation(len(documents))
    num_heldout = max(1, round(heldout_fraction * len(documents)))
    heldout = set(order[:num_heldout].tolist())
    train = [doc for i, doc in enumerate(documents) if i not in heldout]
    return train, [doc for i, doc in enumerate(documents) if i in heldout]


def _split_single(doc: Document, heldout_fraction: float) -> tuple[list[Document], list[Document]]:
    lines = doc.text.splitlines()
    cut = len(lines) - max(1, round(heldout_fraction * len(lines)))
    if cut < 1:
        raise CorpusError(f"{doc.name}: too few lines ({len(lines)}) for a held-out split")
    head, tail = "\n".join(lines[:cut]), "\n".join(lines[cut:])
    return [Document(doc.name, head)], [Document(f"{doc.name}#heldout", tail)]


def tokenize_documents(tokenizer: Tokenizer, documents: list[Document]) -> np.ndarray:
    """One stream: each document's lines, each line ended by the newline id, then EOS."""
    pieces: list[np.ndarray] = []
    for doc in documents:
        lines = doc.text.splitlines()
        ids: list[int] = []
        for line_ids in tokenizer.encode_lines(lines):
            ids.extend(line_ids)
            ids.append(tokenizer.newline_id)
        ids.append(tokenizer.eos_id)
        pieces.append(np.asarray(ids, dtype=np.int32))
    return np.concatenate(pieces)


def _cached_tokens(tokenizer: Tokenizer, documents: list[Document], path: Path) -> np.ndarray:
    content = hashlib.sha256("\0".join(doc.text for doc in documents).encode()).hexdigest()[:16]
    path = path.with_name(f"{path.stem}-{content}.npy")
    if path.is_file():
        return np.load(path)
    tokens = tokenize_documents(tokenizer, documents)
    buffer = io.BytesIO()
    np.save(buffer, tokens)
    write_bytes_atomic(path, buffer.getvalue())
    return tokens
