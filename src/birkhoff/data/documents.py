"""A source's documents as one endless, seeded, rank-sharded stream with resumable positions.

Held-out documents are fixed by position: record j of file f (canonical file order) is held out
when (f + j + split_seed) % heldout_period == heldout_period - 1, so both splits are known while
streaming, never change with the seed, and need no pass over the data. Each epoch of the
training split visits the files in a seeded order (`shuffle`), records in file order; the k-th
training record of an epoch belongs to data-parallel rank k % dp.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from birkhoff.data.sources import DataError, Record, ResolvedSource, read_records

TRAIN, HELDOUT = "train", "heldout"


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream continues: file `file` of epoch `epoch`'s order, record `record` of it;
    `count` records of the split were seen before it in this epoch (all ranks' records)."""

    epoch: int = 0
    file: int = 0
    record: int = 0
    count: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class SplitSpec:
    """Which records of a source a stream yields, and in what order."""

    split: str
    heldout_period: int
    split_seed: int
    seed: int
    source_index: int
    shuffle: bool
    rank: int = 0
    ranks: int = 1

    def is_member(self, file_index: int, record_index: int) -> bool:
        period = self.heldout_period  # 0: no document is held out (data.heldout_sources)
        heldout = (
            period > 0 and (file_index + record_index + self.split_seed) % period == period - 1
        )
        return heldout == (self.split == HELDOUT)

    def file_order(self, num_files: int, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(num_files)
        return np.random.default_rng([self.seed, self.source_index, epoch]).permutation(num_files)


@dataclass(frozen=True)
class SourceRecord:
    """A record of this rank, the file it came from and the position just after it."""

    record: Record
    path: str
    after: StreamPosition


def rank_records(
    source: ResolvedSource, spec: SplitSpec, start: StreamPosition, epochs: int | None = None
) -> Iterator[SourceRecord]:
    """This rank's records of `spec.split` from `start`, for `epochs` epochs (None: forever)."""
    epoch, position = start.epoch, start
    while epochs is None or epoch < start.epoch + epochs:
        owned = yield from _epoch_records(source, spec, epoch, position)
        if not owned and position == StreamPosition(epoch):
            raise DataError(
                f"source {source.config.path}: no {spec.split} documents for data-parallel rank "
                f"{spec.rank} of {spec.ranks} in a whole epoch: add data, or lower "
                "data.heldout_period / the number of ranks"
            )
        epoch += 1
        position = StreamPosition(epoch)


def _epoch_records(
    source: ResolvedSource, spec: SplitSpec, epoch: int, start: StreamPosition
) -> Iterator[SourceRecord]:
    """One epoch from `start`; returns how many records this rank got."""
    order = spec.file_order(len(source.files), epoch)
    count, owned = start.count, 0
    for file_pos in range(start.file, len(order)):
        file_index = int(order[file_pos])
        path = source.files[file_index]
        first = start.record if file_pos == start.file else 0
        for record in read_records(path, source, first):
            if not spec.is_member(file_index, record.index):
                continue
            count += 1
            if (count - 1) % spec.ranks != spec.rank:
                continue
            owned += 1
            yield SourceRecord(
                record, path, StreamPosition(epoch, file_pos, record.index + 1, count)
            )
    return owned
