"""Writing a checkpoint while training goes on (`checkpoint.async_mode=thread|process`).

The step is blocked only while DCP's `async_save` copies the state to host memory; the shards
are then written by a DCP thread or by DCP's checkpoint process. A finisher thread waits for
them and completes the checkpoint (checksums, meta.json, COMPLETE, rename), so a crash before
that leaves only a .tmp directory, which is never loaded. At most one checkpoint is in flight.

Every collective of a background save runs on a gloo group of its own: sharing a group with
training would interleave the two threads' collectives in different orders on different ranks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import _async_process_executor as dcp_process_executor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from birkhoff.checkpoint.errors import CheckpointError

CHECKPOINTER_TYPES = {
    "thread": AsyncCheckpointerType.THREAD,
    "process": AsyncCheckpointerType.PROCESS,
}


def quiet_mesh_warnings_in_children() -> None:
    """DCP's checkpoint process unpickles DTensor meshes without their process groups and
    warns once per tensor that torch.compile could not use them (it compiles nothing). The
    variable is read when torch is imported, so it reaches only processes started later."""
    quiet, current = "-torch.distributed.device_mesh", os.environ.get("TORCH_LOGS", "")
    if quiet not in current.split(","):
        os.environ["TORCH_LOGS"] = ",".join(filter(None, [current, quiet]))


@dataclass
class InFlight:
    step: int
    seconds: Future  # the whole save's duration, once the checkpoint is complete


class BackgroundWriter:
    """Starts background saves and reports each one's completion once."""

    def __init__(self, mode: str, distributed: bool, timeout: timedelta | None = None) -> None:
        self.mode = mode
        self.owns_default_group = False
        self.group: dist.ProcessGroup | None = None
        if distributed:  # a collective: every rank builds it
            self.group = dist.new_group(backend="gloo", timeout=timeout)
        elif mode == "process" and not dist.is_initialized():
            # DCP's checkpoint process finds its rendezvous through a process group.
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            self.owns_default_group = True
        if mode == "process":
            quiet_mesh_warnings_in_children()
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="birkhoff-ckpt")
        self.in_flight: InFlight | None = None

    def start(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        staging: Path,
        complete: Callable[[], None],
        started: float,
    ) -> None:
        """Copy `tensors` to host memory (the caller waits for that only), write them into
        `staging` in the background, then call `complete` from the finisher thread."""
        upload = dcp.async_save(
            tensors,
            checkpoint_id=staging,
            process_group=self.group,
            async_checkpointer_type=CHECKPOINTER_TYPES[self.mode],
        )

        def finish() -> float:
            upload.result()
            complete()
            return time.perf_counter() - started

        self.in_flight = InFlight(step, self._finisher.submit(finish))

    def collect(self, block: bool) -> float | None:
        """The seconds the in-flight save took, once it is complete (None while it is still
        being written, unless `block`); a failed save raises here."""
        if self.in_flight is None or not (block or self.in_flight.seconds.done()):
            return None
        in_flight, self.in_flight = self.in_flight, None
        try:
            return in_flight.seconds.result()
        except (Exception, CheckpointException) as err:  # DCP's is a BaseException
            raise CheckpointError(
                f"the background save of step {in_flight.step} failed ({err}); its .tmp "
                "directory is never loaded"
            ) from err

    def close(self) -> None:
        self._finisher.shutdown(wait=True)
        if self.mode == "process":
            stop_checkpoint_process()
        if self.owns_default_group:
            dist.destroy_process_group()


def stop_checkpoint_process() -> None:
    """End DCP's checkpoint process now. DCP stops it when its handle is garbage-collected,
    which interpreter exit may skip; the process then dies on a closed pipe, with a traceback.
    The handle is a module global of DCP's (private, hence the getattr)."""
    holder = dcp_process_executor
    if getattr(holder, "_CHECKPOINT_PROCESS", None) is not None:
        holder._CHECKPOINT_PROCESS = None  # the last reference: its __del__ sends TERMINATE
