"""Where checkpoints live and how a directory becomes one, atomically.

    <dir>/step-00000050/      a complete checkpoint: DCP shards (*.distcp, .metadata),
        meta.json             step, tokens, layout, recipe, tokenizer, model config
        ranks/rank-00000.json data-loader and RNG state of each rank (JSON: nothing unpickled)
        checksums.json        size and sha256 of every file above (each rank hashes a share)
        COMPLETE              written last, once every rank finished
    <dir>/step-00000100.tmp/  being written (or left by a crash): never loaded, removed on save

Every rank writes its shards and rank state into the .tmp directory, rank 0 meta.json too;
after a barrier the ranks hash the files, then rank 0 writes checksums.json and COMPLETE and
renames the directory. A directory without COMPLETE is ignored. Before a checkpoint is loaded
every file is verified, and one its checksums do not list is refused: a checkpoint may come
from someone else (DCP's .metadata is unpickled by an allow-list, safe_metadata.py). With
checkpoint.async_mode=thread|process the writing and completing happen in the background
(background.py).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from birkhoff.atomic import write_text_atomic
from birkhoff.checkpoint import codec
from birkhoff.checkpoint.background import BackgroundWriter
from birkhoff.checkpoint.config import CheckpointConfig
from birkhoff.checkpoint.contents import tensor_metadata
from birkhoff.checkpoint.errors import CheckpointError
from birkhoff.checkpoint.integrity import (
    CHECKSUMS,
    COMPLETE,
    SUMS_PREFIX,
    checkpoint_files,
    digest,
    my_share,
    problems,
    read_checksums,
    unlisted,
)
from birkhoff.checkpoint.safe_metadata import load_checkpoint_tensors
from birkhoff.checkpoint.space import (
    SaveFailed,
    describe_failure,
    disk_bytes,
    local_bytes,
    space_warning,
    storage_error,
)
from birkhoff.checkpoint.state import TrainingState

META = "meta.json"
RANKS = "ranks"
PREFIX = "step-"
STEP_NAME = re.compile(r"step-(\d+)(\.tmp)?")  # a checkpoint, or one being written

HASH_TABLE = ".router.hash_table"  # a hash-routed MoE layer's token -> experts table


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / META).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and p.suffix != ".tmp"]
    return sorted((p for p in found if is_complete(p)), key=_step_of)


def _step_of(path: Path) -> int:
    return int(STEP_NAME.fullmatch(path.name).group(1))


def read_meta(path: Path) -> dict[str, Any]:
    if not is_complete(path):
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {COMPLETE} marker: it was being written "
            "when the run stopped); resume from an earlier one or use train.resume=auto"
        )
    try:
        return json.loads((path / META).read_text())
    except ValueError as err:
        raise CheckpointError(f"{path / META} is unreadable ({err})") from None


class CheckpointManager:
    def __init__(
        self,
        root: Path,
        cfg: CheckpointConfig,
        rank: int,
        distributed: bool,
        timeout: timedelta | None = None,
    ) -> None:
        """`timeout`: the run's collective timeout, for the group the saves agree over."""
        self.root, self.cfg, self.rank, self.distributed = root, cfg, rank, distributed
        background = cfg.async_mode != "off"
        writer = BackgroundWriter(cfg.async_mode, distributed, timeout) if background else None
        self.writer = writer
        # Saves agree over gloo whatever the training backend: their flags are CPU tensors.
        gloo = None
        if distributed and not background:
            gloo = dist.new_group(backend="gloo", timeout=timeout)
        self._group = self.writer.group if self.writer else gloo
        self._finished_seconds: float | None = None  # a synchronous save's, until collected
        self._needed = 0  # bytes the save in progress is expected to take (rank 0)
        self._failure: SaveFailed | None = None  # an earlier background save's, to report

    def due(self, step: int, last: bool) -> bool:
        periodic = self.cfg.every > 0 and step % self.cfg.every == 0
        in_flight = self.writer and self.writer.in_flight and self.writer.in_flight.step == step
        return (
            (periodic or (last and self.cfg.at_end))
            and not in_flight
            and not is_complete(step_dir(self.root, step))
        )

    def save(
        self, step: int, state: TrainingState, rank_state: dict, meta: dict[str, Any]
    ) -> float:
        """Checkpoint `step` (collective: every rank calls it); returns the seconds the caller
        was blocked: the whole save, or with a background writer the wait for the previous
        save plus the copy to host memory."""
        start = time.perf_counter()
        if self.writer:
            try:
                self._finished_seconds = self._collect(block=True)
            except SaveFailed as failed:  # reported by `completed`; this save goes ahead
                self._failure = failed
        this_save = time.perf_counter()
        final = step_dir(self.root, step)
        staging = final.with_name(final.name + ".tmp")
        tensors = state.tensors()
        if self.rank == 0:
            self._needed = self._expected_bytes(tensors)
            warning = space_warning(step, self.root, self._needed)
            if warning:
                print(f"birkhoff: warning: {warning}", file=sys.stderr, flush=True)
        self._together(lambda: self._make_staging(staging))

        # Serialized now: the loader and RNG move on while a background save is written.
        rank_text = codec.dumps(rank_state)
        meta_text = json.dumps({**meta, "step": step}, indent=2) + "\n"

        def complete() -> None:
            self._complete(staging, final, rank_text, meta_text)

        if self.writer:
            self.writer.start(step, tensors, staging, complete, this_save)
        else:
            try:
                dcp.save(tensors, checkpoint_id=staging)  # a failure is raised on every rank
                complete()
            except (Exception, CheckpointException) as err:  # DCP's is a BaseException
                self._failed(step, err)
            self._finished_seconds = time.perf_counter() - this_save
        return time.perf_counter() - start

    def _make_staging(self, staging: Path) -> None:
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash: never complete
            (staging / RANKS).mkdir(parents=True)

    def _expected_bytes(self, tensors: dict) -> int:
        """What the next checkpoint will take: the newest one's size, or before the first
        this rank's tensors times the ranks (replicated tensors make it an overestimate)."""
        found = complete_checkpoints(self.root)
        return disk_bytes(found[-1]) if found else local_bytes(tensors) * self._world()

    def _failed(self, step: int, err: BaseException) -> None:
        """A save that failed for lack of space or a storage error becomes SaveFailed, and
        its partial directory is removed; any other failure is raised as it is."""
        cause = storage_error(err)
        if cause is None:
            raise err
        staging = step_dir(self.root, step).with_name(step_dir(self.root, step).name + ".tmp")
        self._barrier()
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise SaveFailed(step, describe_failure(step, cause, staging, self._needed)) from err

    def _collect(self, block: bool) -> float | None:
        in_flight = self.writer.in_flight
        try:
            return self.writer.collect(block)
        except CheckpointError as err:
            self._failed(in_flight.step, err)
            raise

    def _together(self, write: Callable[[], None]) -> None:
        """Run this rank's part of a save; if it fails on any rank, it fails on every rank
        (with the first rank's errno), so that no rank waits in a collective for another."""
        failure: OSError | None = None
        try:
            write()
        except OSError as err:
            failure = err
        if self.distributed:
            code = torch.tensor(float(failure.errno or errno.EIO) if failure else 0.0)
            dist.all_reduce(code, op=dist.ReduceOp.MAX, group=self._group)
            if code.item() and failure is None:
                number = int(code.item())
                failure = OSError(number, f"{os.strerror(number)} (on another rank)")
        if failure is not None:
            raise failure

    def completed(self, wait: bool = False) -> float | None:
        """The seconds the last save took from start to COMPLETE, reported once, when it is
        complete (`wait`: until the background save, if any, is). Raises if it failed
        (SaveFailed when storage was the reason)."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        if self.writer and (wait or self.writer.in_flight):
            background = self._collect(block=wait)
            if background is not None:
                return background
        seconds, self._finished_seconds = self._finished_seconds, None
        return seconds

    def close(self) -> None:
        """Wait for a background save and release the writer (call once training ended)."""
        if self.writer:
            try:
                self._collect(block=True)
            finally:
                self.writer.close()

    def _complete(self, staging: Path, final: Path, rank_text: str, meta_text: str) -> None:
        """Per-rank state (and meta.json, rank 0) and the checksums of every file, then (rank 0,
        once every rank is done) checksums.json, the COMPLETE marker, the rename and
        retention. Each stage ends together on every rank, also when it failed on one."""

        def write_state() -> None:
            write_text_atomic(staging / RANKS / f"rank-{self.rank:05d}.json", rank_text)
            if self.rank == 0:  # before the hashing, so that an edited step or recipe is found
                write_text_atomic(staging / META, meta_text)

        def hash_share() -> None:
            mine = my_share(checkpoint_files(staging), self.rank, self._world())
            sums = json.dumps({name: digest(staging / name) for name in mine})
            write_text_atomic(staging / RANKS / f"{SUMS_PREFIX}{self.rank:05d}.json", sums)

        def finish() -> None:
            if self.rank == 0:
                self._merge_checksums(staging)
                write_text_atomic(staging / COMPLETE, f"{time.time()}\n")
                staging.rename(final)
                self._apply_retention()

        for stage in (write_state, hash_share, finish):
            self._together(stage)

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: None (start fresh), the newest complete and intact
        one for `auto` (falling back past damaged ones, and saying so; None if there is none
        yet), or a given directory, which must be complete and intact. Collective."""
        if not resume:
            return None
        if resume == "auto":
            found = complete_checkpoints(self.root)
            for path in reversed(found):
                damage = self.verify(path)
                if not damage:
                    return path
                if self.rank == 0:
                    print(f"birkhoff: {damage[0]}; falling back to the previous checkpoint")
            if found:
                raise CheckpointError(
                    f"every checkpoint in {self.root} is damaged; resume from a copy with "
                    "train.resume=PATH, or start a new run"
                )
            return None
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"train.resume={resume}: no such checkpoint directory")
        read_meta(path)
        damage = self.verify(path)
        if damage:
            raise CheckpointError(f"train.resume={resume}: {'; '.join(damage)}")
        return path

    def verify(self, path: Path) -> list[str]:
        """Every damaged, missing or unlisted file of a complete checkpoint, or its missing
        checksums (each rank checks its share of the files; rank 0 the rest; the answer is
        the same on every rank)."""
        everything_else = self.rank == 0
        try:
            expected = read_checksums(path)
        except CheckpointError as err:
            expected, found = {}, [str(err)] if everything_else else []
        else:
            found = unlisted(path, expected) if everything_else else []
        mine = my_share(sorted(expected), self.rank, self._world())
        found = problems(path, expected, mine) + found
        if not self.distributed:
            return found
        everyone: list[list[str]] = [[] for _ in range(self._world())]
        dist.all_gather_object(everyone, found)
        return [problem for rank_found in everyone for problem in rank_found]

    def load(self, path: Path, state: TrainingState) -> dict[str, Any]:
        """Load model and optimizer (resharded to this layout) and put the LR schedule at the
        saved step; returns meta.json. Collective."""
        meta = read_meta(path)
        tensors = state.tensors()
        saved = tensor_metadata(path)
        for name in [n for n in tensors if n.endswith(HASH_TABLE) and n not in saved]:
            # Written before hash tables were saved: the seed draws the same table again.
            del tensors[name]
            if self.rank == 0:
                print(f"birkhoff: {path} has no {name}; drawn from model.moe.hash_seed")
        load_checkpoint_tensors(tensors, path)
        state.load_tensors(tensors)
        state.restore_schedule(int(meta["step"]))
        return meta

    def set_aside_after(self, step: int) -> list[Path]:
        """After a rollback to `step`: wait for a save in flight, then rename every complete
        checkpoint of a later step to NAME.rolled-back (kept for inspection, invisible to
        resume and retention), so the retrained steps are saved and `auto` resumes from
        them. Collective; returns the renamed directories."""
        self.completed(wait=True)
        later = [p for p in complete_checkpoints(self.root) if _step_of(p) > step]
        if self.rank == 0:
            for path in later:
                aside = path.with_name(f"{path.name}.rolled-back")
                shutil.rmtree(aside, ignore_errors=True)  # an earlier rollback's
                path.rename(aside)
        self._barrier()
        return later

    def rank_states(self, path: Path) -> list[dict[str, Any]]:
        """Every rank's saved loader and RNG state, by saved global rank."""
        files = sorted((path / RANKS).glob("rank-*.json"))
        return [codec.loads(f.read_text()) for f in files]

    def _apply_retention(self) -> None:
        """Keep the newest keep_last complete checkpoints and every keep_every-th step; remove
        .tmp directories older than the newest complete one (left by a crash)."""
        complete = complete_checkpoints(self.root)
        for path in complete[: -self.cfg.keep_last]:
            if not (self.cfg.keep_every and _step_of(path) % self.cfg.keep_every == 0):
                shutil.rmtree(path)
        for path in self.root.glob(f"{PREFIX}*.tmp"):
            if STEP_NAME.fullmatch(path.name) and _step_of(path) < _step_of(complete[-1]):
                shutil.rmtree(path, ignore_errors=True)

    def _merge_checksums(self, staging: Path) -> None:
        merged: dict[str, Any] = {}
        for part in sorted((staging / RANKS).glob(f"{SUMS_PREFIX}*.json")):
            merged.update(json.loads(part.read_text()))
            part.unlink()
        write_text_atomic(staging / CHECKSUMS, json.dumps(merged, indent=1, sort_keys=True))

    def _world(self) -> int:
        return dist.get_world_size() if self.distributed else 1

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._group)
