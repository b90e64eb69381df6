"""Where checkpoints live and how a directory becomes one, atomically.

    <dir>/step-00000050/      a complete checkpoint: DCP shards (*.distcp, .metadata),
        meta.json             step, tokens, layout, recipe, tokenizer, model config
        ranks/rank-00000.json data-loader and RNG state of each rank (JSON: nothing unpickled)
        checksums.json        size and sha256 of every file above (each rank hashes a share)
        COMPLETE              written last, once every rank finished
    <dir>/step-00000100.tmp/  being written (or left by a crash): never loaded, removed on save

Every rank writes its shards into the .tmp directory; after a barrier rank 0 writes meta.json
and COMPLETE, then renames the directory. A directory without COMPLETE is ignored. With
checkpoint.async_mode=thread|process the writing and completing happen in the background
(background.py).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from birkhoff.atomic import write_text_atomic
from birkhoff.checkpoint import codec
from birkhoff.checkpoint.background import BackgroundWriter
from birkhoff.checkpoint.config import CheckpointConfig
from birkhoff.checkpoint.errors import CheckpointError
from birkhoff.checkpoint.integrity import (
    CHECKSUMS,
    SUMS_PREFIX,
    checkpoint_files,
    digest,
    my_share,
    problems,
)
from birkhoff.checkpoint.state import TrainingState

COMPLETE = "COMPLETE"
META = "meta.json"
RANKS = "ranks"
PREFIX = "step-"
STEP_NAME = re.compile(r"step-(\d+)(\.tmp)?")  # a checkpoint, or one being written


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
    return json.loads((path / META).read_text())


class CheckpointManager:
    def __init__(self, root: Path, cfg: CheckpointConfig, rank: int, distributed: bool) -> None:
        self.root, self.cfg, self.rank, self.distributed = root, cfg, rank, distributed
        background = cfg.async_mode != "off"
        self.writer = BackgroundWriter(cfg.async_mode, distributed) if background else None
        self._group = self.writer.group if self.writer else None
        self._finished_seconds: float | None = None  # a synchronous save's, until collected

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
            self._finished_seconds = self.writer.collect(block=True)
        this_save = time.perf_counter()
        final = step_dir(self.root, step)
        staging = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash: never complete
            (staging / RANKS).mkdir(parents=True)
        self._barrier()

        # Serialized now: the loader and RNG move on while a background save is written.
        rank_text = codec.dumps(rank_state)
        meta_text = json.dumps({**meta, "step": step}, indent=2) + "\n"

        def complete() -> None:
            self._complete(staging, final, rank_text, meta_text)

        if self.writer:
            self.writer.start(step, state.tensors(), staging, complete, this_save)
        else:
            dcp.save(state.tensors(), checkpoint_id=staging)
            complete()
            self._finished_seconds = time.perf_counter() - this_save
        return time.perf_counter() - start

    def completed(self, wait: bool = False) -> float | None:
        """The seconds the last save took from start to COMPLETE, reported once, when it is
        complete (`wait`: until the background save, if any, is). Raises if it failed."""
        if self.writer and (wait or self.writer.in_flight):
            background = self.writer.collect(block=wait)
            if background is not None:
                return background
        seconds, self._finished_seconds = self._finished_seconds, None
        return seconds

    def close(self) -> None:
        """Wait for a background save and release the writer (call once training ended)."""
        if self.writer:
            self.writer.collect(block=True)
            self.writer.close()

    def _complete(self, staging: Path, final: Path, rank_text: str, meta_text: str) -> None:
        """Per-rank state and checksums, then (rank 0, once every rank is done) meta.json,
        the COMPLETE marker, the rename and retention."""
        write_text_atomic(staging / RANKS / f"rank-{self.rank:05d}.json", rank_text)
        self._barrier()
        mine = my_share(checkpoint_files(staging), self.rank, self._world())
        sums = {name: digest(staging / name) for name in mine}
        write_text_atomic(staging / RANKS / f"{SUMS_PREFIX}{self.rank:05d}.json", json.dumps(sums))
        self._barrier()
        if self.rank == 0:
            self._merge_checksums(staging)
            write_text_atomic(staging / META, meta_text)
            write_text_atomic(staging / COMPLETE, f"{time.time()}\n")
            staging.rename(final)
            self._apply_retention()
        self._barrier()

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
        """Every damaged or missing file of a complete checkpoint (each rank checks its share
        of the files; the answer is the same on every rank)."""
        expected = json.loads((path / CHECKSUMS).read_text())
        mine = my_share(sorted(expected), self.rank, self._world())
        found = problems(path, expected, mine)
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
        dcp.load(tensors, checkpoint_id=path)
        state.load_tensors(tensors)
        state.restore_schedule(int(meta["step"]))
        return meta

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
