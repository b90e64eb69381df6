"""The per-rank training loader: blended sources -> this rank's share of each global batch.

Global sample g (g = step * global_batch + position) comes from source blend(g) (blend.py).
Data-parallel rank r takes the contiguous positions [r * B / dp, (r + 1) * B / dp) of every
global batch. What a sample holds depends on the source:
  - prepared shards: the k-th sample ever taken from source s is window
    permute(k mod N_s; seed, s, epoch = k div N_s) of its N_s windows. This is a pure function
    of (seed, epoch, position), so the order is the same for any number of ranks or workers,
    and a resume on another data-parallel degree continues exactly;
  - streaming: the next window of this rank's own document stream (documents dealt k mod dp),
    so a streaming state belongs to its data-parallel degree and a resume on another refuses.
Loader workers tokenize (streaming) or read and featurize whole batches (prepared); neither
changes what a batch holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.utils.data

from birkhoff.data.batch import Batch, BatchBuilder
from birkhoff.data.blend import BlendSchedule
from birkhoff.data.documents import HELDOUT, TRAIN, SplitSpec
from birkhoff.data.permutation import permute
from birkhoff.data.plan import DataPlan
from birkhoff.data.shards import PreparedSplit
from birkhoff.data.sources import DataError, ResolvedSource
from birkhoff.data.stream import WindowPacker, keep_as_is
from birkhoff.data.tokenizer import describe_identity, same_tokenizer
from birkhoff.data.workers import ignore_stop_signals

STATE_VERSION = 1
Reader = PreparedSplit | WindowPacker


@dataclass(frozen=True)
class Layout:
    """How the global batch is dealt: sizes and this rank's place."""

    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    seed: int

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.dp_size


@dataclass(frozen=True)
class Plan:
    """One step of this rank: (source, k-th sample of that source) per row, and the blend
    state after the whole global batch."""

    rows: tuple[tuple[int, int], ...]
    counts_after: tuple[int, ...]


class PreparedWindows:
    """Windows of prepared sources by (source, k): the seeded per-epoch permutation."""

    def __init__(self, readers: list[PreparedSplit], seed: int, shuffle: bool) -> None:
        self.readers, self.seed, self.shuffle = readers, seed, shuffle

    def window(self, source: int, k: int) -> np.ndarray:
        reader = self.readers[source]
        epoch, index = divmod(k, reader.num_windows)
        if self.shuffle:
            index = int(
                permute(np.array([index]), reader.num_windows, (self.seed, source, epoch))[0]
            )
        return reader.window(index)


class PlanBatches(torch.utils.data.Dataset):
    """Map-style view for DataLoader workers: a Plan -> (Plan, Batch), read and featurized in
    the worker (Engram hashes included)."""

    def __init__(self, windows: PreparedWindows, build: BatchBuilder) -> None:
        self.windows, self.build = windows, build

    def __getitem__(self, plan: Plan) -> tuple[Plan, Batch]:
        rows = [self.windows.window(s, k) for s, k in plan.rows]
        return plan, self.build(np.stack(rows))


class TrainLoader:
    def __init__(self, plan: DataPlan, layout: Layout, build: BatchBuilder) -> None:
        cfg = plan.config
        self.plan, self.layout, self.build, self.cfg = plan, layout, build, cfg
        self.schedule = BlendSchedule([source.config.weight for source in plan.sources])
        self.readers: list[Reader] = [
            self._reader(index, source) for index, source in enumerate(plan.sources)
        ]
        self.streaming = any(isinstance(r, WindowPacker) for r in self.readers)
        self.samples = 0  # global samples consumed
        self.counts = np.zeros(len(self.readers), dtype=np.int64)  # ... per source
        self._batches: Iterator[tuple[Plan, Batch]] | None = None

    def next_batch(self) -> list[Batch]:
        """This rank's share of the next global batch, as micro-batches."""
        if self._batches is None:
            self._batches = self._start()
        plan, batch = next(self._batches)
        self.counts = np.asarray(plan.counts_after, dtype=np.int64)
        self.samples += self.layout.global_batch_size
        return batch.split(self.layout.micro_batch_size)

    @property
    def skipped_records(self) -> int:
        """Bad records and empty files skipped so far by this rank (data.on_bad_record=skip)."""
        streams = sum(r.skipped for r in self.readers if isinstance(r, WindowPacker))
        return self.plan.empty_files + streams

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "samples": self.samples,
            "counts": self.counts.tolist(),
            "seed": self.layout.seed,
            "seq_len": self.cfg.seq_len,
            "dp_size": self.layout.dp_size,
            "dp_rank": self.layout.dp_rank,
            "tokenizer": self.plan.tokenizer.identity(),
            "sources": self._source_identity(),
            "streams": [
                r.state_dict() if isinstance(r, WindowPacker) else None for r in self.readers
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` stopped, or raise DataError saying what differs."""
        self._check_compatible(state)
        self.close()
        self.samples = int(state["samples"])
        self.counts = np.asarray(state["counts"], dtype=np.int64)
        for reader, stream in zip(self.readers, state["streams"], strict=True):
            if isinstance(reader, WindowPacker):
                reader.load_state_dict(stream)

    def close(self) -> None:
        self._batches = None
        for reader in self.readers:
            if isinstance(reader, WindowPacker):
                reader.close()

    def _reader(self, index: int, source: ResolvedSource) -> Reader:
        cfg = self.cfg
        if source.format == "prepared":
            reader = PreparedSplit(source.files[0], TRAIN, cfg.seq_len)
            if reader.num_windows == 0:
                raise DataError(f"{source.config.path}: fewer than {cfg.seq_len + 1} tokens")
            return reader
        spec = SplitSpec(
            TRAIN,
            cfg.train_split_period,
            cfg.split_seed,
            self.layout.seed,
            index,
            cfg.shuffle,
            self.layout.dp_rank,
            self.layout.dp_size,
        )
        return WindowPacker(
            source,
            spec,
            cfg.seq_len,
            self.plan.tokenizer,
            cfg.on_bad_record == "skip",
            cfg.num_workers,
            shuffle_buffer=cfg.shuffle_buffer if cfg.shuffle else 0,
        )

    def _plans(self) -> Iterator[Plan]:
        counts = self.counts.copy()
        first = self.layout.dp_rank * self.layout.per_rank
        last = first + self.layout.per_rank
        while True:
            taken = counts.copy()  # samples of each source before the current position
            sources = self.schedule.assign(counts, self.layout.global_batch_size)
            rows = []
            for position, source in enumerate(sources[:last].tolist()):
                if position >= first:
                    rows.append((source, int(taken[source])))
                taken[source] += 1
            yield Plan(tuple(rows), tuple(counts.tolist()))

    def _start(self) -> Iterator[tuple[Plan, Batch]]:
        if self.streaming or self.cfg.num_workers == 0:
            return self._inline()
        prepared = PreparedWindows(self.readers, self.layout.seed, self.cfg.shuffle)
        loader = torch.utils.data.DataLoader(
            PlanBatches(prepared, self.build),
            batch_size=None,
            sampler=self._plans(),
            num_workers=self.cfg.num_workers,
            collate_fn=keep_as_is,
            prefetch_factor=self.cfg.prefetch_batches,
            worker_init_fn=ignore_stop_signals,
        )
        return iter(loader)

    def _inline(self) -> Iterator[tuple[Plan, Batch]]:
        prepared = PreparedWindows(self.readers, self.layout.seed, self.cfg.shuffle)
        for plan in self._plans():
            rows = []
            for source, k in plan.rows:
                reader = self.readers[source]
                if isinstance(reader, WindowPacker):
                    window = reader.next_window()
                    assert window is not None  # training streams are endless
                    rows.append(window)
                else:
                    rows.append(prepared.window(source, k))
            yield plan, self.build(np.stack(rows))

    def _source_identity(self) -> list[dict[str, Any]]:
        return [
            {"path": s.config.path, "weight": s.config.weight, "format": s.format}
            for s in self.plan.sources
        ]

    def _check_compatible(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        if not same_tokenizer(state["tokenizer"], mine["tokenizer"]):
            raise DataError(
                f"the run being resumed used tokenizer {describe_identity(state['tokenizer'])}; "
                f"this one has {describe_identity(mine['tokenizer'])}: resume with the same "
                "data.tokenizer.kind and data.tokenizer.path"
            )
        for key in ("sources", "seq_len", "seed"):
            if state[key] != mine[key]:
                raise DataError(
                    f"the run being resumed had {key}={state[key]}, this one has {mine[key]}: "
                    "the data order cannot continue exactly; resume with the same data recipe"
                )
        if self.streaming and state["dp_size"] != self.layout.dp_size:
            raise DataError(
                f"the run being resumed read streaming sources with {state['dp_size']} "
                f"data-parallel ranks and this run has {self.layout.dp_size}: a streaming "
                "position belongs to its rank, so it cannot be remapped without repeating or "
                f"skipping data. Resume with {state['dp_size']} data-parallel ranks, or train "
                "from prepared shards (`birkhoff data prepare`), which resume on any degree"
            )
        if self.streaming and state["dp_rank"] != self.layout.dp_rank:
            raise DataError(
                f"loader state of data-parallel rank {state['dp_rank']} given to rank "
                f"{self.layout.dp_rank}"
            )


def heldout_windows(plan: DataPlan, num_windows: int) -> np.ndarray:
    """The first `num_windows` held-out windows of the blend, in order (num_windows, T + 1).
    The same on every rank; each takes its slice of every batch. Read once per plan."""
    if num_windows not in plan.heldout:
        windows = _read_heldout(plan, num_windows)
        windows.flags.writeable = False
        plan.heldout[num_windows] = windows
    return plan.heldout[num_windows]


def _read_heldout(plan: DataPlan, num_windows: int) -> np.ndarray:
    """Blended by weight from data.heldout_sources (read whole) when given, else from every
    source's held-out documents."""
    cfg = plan.config
    named = bool(plan.heldout_sources)
    resolved = plan.heldout_sources if named else plan.sources
    counts = np.zeros(len(resolved), dtype=np.int64)
    sources = BlendSchedule([s.config.weight for s in resolved]).assign(counts, num_windows)
    per_source = [_heldout_of(plan, i, int(n), named) for i, n in enumerate(counts)]
    taken = np.zeros(len(resolved), dtype=np.int64)
    rows = []
    for source in sources:
        rows.append(per_source[source][taken[source]])
        taken[source] += 1
    return np.stack(rows) if rows else np.zeros((0, cfg.seq_len + 1), dtype=np.int64)


def _heldout_of(plan: DataPlan, index: int, needed: int, named: bool) -> list[np.ndarray]:
    cfg = plan.config
    source = plan.heldout_sources[index] if named else plan.sources[index]
    if needed == 0:
        return []
    if source.format == "prepared":
        windows = []
        # a named held-out source is read whole: its training split, then its held-out one
        for split in (TRAIN, HELDOUT) if named else (HELDOUT,):
            reader = PreparedSplit(source.files[0], split, cfg.seq_len)
            count = min(needed - len(windows), reader.num_windows)
            windows += [reader.window(i) for i in range(count)]
    else:
        # A named held-out source is read whole: every document is in its "train" split.
        split, period = (TRAIN, 0) if named else (HELDOUT, cfg.heldout_period)
        spec = SplitSpec(split, period, cfg.split_seed, 0, index, shuffle=False)
        packer = WindowPacker(
            source,
            spec,
            cfg.seq_len,
            plan.tokenizer,
            cfg.on_bad_record == "skip",
            workers=0,
            epochs=1,
        )
        windows = []
        while len(windows) < needed and (window := packer.next_window()) is not None:
            windows.append(window.astype(np.int64))
    if len(windows) < needed:
        raise DataError(
            f"data.{'heldout_sources' if named else 'sources'}.{index} ({source.config.path}): "
            f"the held-out split has "
            f"{len(windows)} windows of data.seq_len={cfg.seq_len}, evaluation needs {needed}: "
            "lower train.eval_batches or train.global_batch_size, or add data"
        )
    return windows
