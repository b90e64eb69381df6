"""Streaming path: tokenize a rank's documents in loader worker processes, pack them into windows.

Workers split the work by chunks of documents (chunk c goes to worker c % workers) and the
DataLoader hands chunks back in order, so the token stream, and every window packed from it,
is the same for any number of workers. Window i is seq_len + 1 tokens; consecutive windows
share one token (the last target of one is the first input of the next), as in prepared shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.utils.data

from birkhoff.data.documents import SourceRecord, SplitSpec, StreamPosition, rank_records
from birkhoff.data.sources import DataError, ResolvedSource, describe
from birkhoff.data.tokenizer import Tokenizer
from birkhoff.data.workers import ignore_stop_signals

CHUNK_CHARS = 1 << 20  # a chunk ends after ~1 MB of text or CHUNK_DOCS documents
CHUNK_DOCS = 512


@dataclass(frozen=True)
class TokenizedDocument:
    """Token ids of one record (None when it was skipped as bad) and the position after it."""

    tokens: np.ndarray | None
    after: StreamPosition


class TokenizedDocuments(torch.utils.data.IterableDataset):
    """Chunks (lists of TokenizedDocument) of one rank's records, from `start` on. Worker
    processes get `tokenizer` by fork, or pickled as what loads it again (never the loaded one)."""

    def __init__(
        self,
        source: ResolvedSource,
        spec: SplitSpec,
        start: StreamPosition,
        tokenizer: Tokenizer,
        skip_bad: bool,
        epochs: int | None = None,
    ) -> None:
        self.source, self.spec, self.start = source, spec, start
        self.tokenizer, self.skip_bad, self.epochs = tokenizer, skip_bad, epochs

    def __iter__(self) -> Iterator[list[TokenizedDocument]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        records = rank_records(self.source, self.spec, self.start, self.epochs)
        for index, chunk in enumerate(_chunks(records)):
            if index % workers == worker:
                yield [self._tokenize(self.tokenizer, item) for item in chunk]

    def _tokenize(self, tokenizer: Tokenizer, item: SourceRecord) -> TokenizedDocument:
        record = item.record
        if record.problem is not None:
            if not self.skip_bad:
                raise DataError(
                    f"{describe(item.path, record, self.source)} "
                    "(fix the file, or set data.on_bad_record=skip)"
                )
            return TokenizedDocument(None, item.after)
        if not record.text.strip():
            return TokenizedDocument(np.zeros(0, dtype=np.int32), item.after)
        return TokenizedDocument(tokenizer.encode_document(record.text), item.after)


def _chunks(records: Iterator[SourceRecord]) -> Iterator[list[SourceRecord]]:
    chunk: list[SourceRecord] = []
    chars = 0
    for item in records:
        chunk.append(item)
        chars += len(item.record.text or "")
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def keep_as_is(item: Any) -> Any:
    """DataLoader collate that leaves chunks as they are (module level: workers pickle it)."""
    return item


class WindowPacker:
    """Packs one rank's document stream of a source into windows of seq_len + 1 tokens, then
    draws them at random from a seeded buffer of `shuffle_buffer` windows (0: in order), so a
    batch does not hold consecutive windows of one document.

    State: the position after the last document taken, the tokens not yet packed, the buffer
    and its generator, and the bad records skipped; a packer restarted from its state emits
    exactly the windows that follow.
    """

    def __init__(
        self,
        source: ResolvedSource,
        spec: SplitSpec,
        seq_len: int,
        tokenizer: Tokenizer,
        skip_bad: bool,
        workers: int,
        epochs: int | None = None,
        shuffle_buffer: int = 0,
    ) -> None:
        self.source, self.spec, self.seq_len = source, spec, seq_len
        self.tokenizer, self.skip_bad = tokenizer, skip_bad
        self.workers, self.epochs, self.shuffle_buffer = workers, epochs, shuffle_buffer
        self.position = StreamPosition()
        self.carry = np.zeros(0, dtype=np.int32)
        self.buffer: list[np.ndarray] = []
        self.rng = np.random.default_rng([spec.seed, spec.source_index, spec.rank, 7])
        self.skipped = 0
        self._documents: Iterator[TokenizedDocument] | None = None

    def next_window(self) -> np.ndarray | None:
        """The next window, or None when a finite stream (`epochs`) is used up."""
        while len(self.buffer) < self.shuffle_buffer:
            window = self._pack()
            if window is None:
                break
            self.buffer.append(window.copy())  # a copy: views would pin whole documents
        if not self.buffer:
            return self._pack()
        pick = int(self.rng.integers(len(self.buffer)))
        self.buffer[pick], self.buffer[-1] = self.buffer[-1], self.buffer[pick]
        return self.buffer.pop()

    def _pack(self) -> np.ndarray | None:
        while len(self.carry) < self.seq_len + 1:  # concatenate only short carries: O(tokens)
            document = self._next_document()
            if document is None:
                return None
            self.carry = np.concatenate((self.carry, document))
        window = self.carry[: self.seq_len + 1]
        self.carry = self.carry[self.seq_len :]
        return window

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position.as_dict(),
            "carry": self.carry.copy(),
            "buffer": np.array(self.buffer, dtype=np.int32).reshape(-1, self.seq_len + 1),
            "rng": self.rng.bit_generator.state,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.position = StreamPosition(**state["position"])
        self.carry = np.asarray(state["carry"], dtype=np.int32)
        self.buffer = list(np.asarray(state["buffer"], dtype=np.int32))
        self.rng.bit_generator.state = state["rng"]
        self.skipped = int(state["skipped"])

    def close(self) -> None:
        self._documents = None  # drops the DataLoader iterator, which stops its workers

    def _next_document(self) -> np.ndarray | None:
        if self._documents is None:
            self._documents = self._start()
        for document in self._documents:
            self.position = document.after
            if document.tokens is None:
                self.skipped += 1
                continue
            return document.tokens
        return None

    def _start(self) -> Iterator[TokenizedDocument]:
        dataset = TokenizedDocuments(
            self.source, self.spec, self.position, self.tokenizer, self.skip_bad, self.epochs
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            collate_fn=keep_as_is,
            prefetch_factor=4 if self.workers else None,
            worker_init_fn=ignore_stop_signals,
        )
        return (document for chunk in loader for document in chunk)
