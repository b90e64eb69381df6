"""A per-rank watchdog: when no training step finishes within `train.hang_timeout_s`, the rank
writes every thread's Python stack (and, on NCCL, the flight recorder) to RUN_DIR/hang/ and
exits non-zero, so that the launcher reports where each rank was and an elastic agent with
`launch.max_restarts` can restart the job.

Every rank runs its own watchdog. The ranks of a hung job all finished the same last step
within milliseconds (it ends with a collective), so their deadlines pass together: the rank
that is stuck and the ranks waiting for it in a collective each leave a dump.

A Python thread does the dump, because it can name the line the main thread is on and tell
the launcher; it needs the GIL. faulthandler's C watchdog is the backstop for a main thread
that holds the GIL for good: it dumps to stderr and exits a grace period later.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from birkhoff.train.rank_errors import HANG, report_rank_error

HANG_DIR = "hang"
HANG_EXIT_CODE = 1


def hang_dump_path(run_dir: Path, rank: int) -> Path:
    return run_dir / HANG_DIR / f"rank-{rank}.txt"


def enable_nccl_flight_recorder(run_dir: Path) -> None:
    """NCCL keeps the last collectives of every group and dumps them on a collective timeout
    (read the files with `torch.distributed.flight_recorder`); set before the process group
    starts. Values the user exported win."""
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(run_dir / HANG_DIR / "nccl-trace-rank-"))
    (run_dir / HANG_DIR).mkdir(parents=True, exist_ok=True)


class HangWatchdog:
    """Use as a context manager around training; call `progress(step)` whenever the run
    moved on (a step, an evaluation, a checkpoint). `timeout_s` None: no watchdog."""

    def __init__(
        self,
        timeout_s: float | None,
        run_dir: Path | None,
        rank: int = 0,
        error_dir: str | None = None,
        nccl: bool = False,
    ) -> None:
        self.timeout_s, self.run_dir, self.rank = timeout_s, run_dir, rank
        self.error_dir, self.nccl = error_dir, nccl
        self.grace_s = min(60.0, timeout_s or 0.0)
        self._last = time.monotonic()
        self._step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s is not None

    def __enter__(self) -> HangWatchdog:
        if self.enabled:
            self.progress(self._step)
            self._thread = threading.Thread(
                target=self._watch, name="birkhoff-hang-watchdog", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if _backstop_file() is not None:
                faulthandler.cancel_dump_traceback_later()

    def progress(self, step: int) -> None:
        """The run moved on: the deadline starts again from now."""
        self._step, self._last = step, time.monotonic()
        if self.enabled and _backstop_file() is not None:
            deadline = self.timeout_s + self.grace_s
            faulthandler.dump_traceback_later(deadline, exit=True, file=_backstop_file())

    @property
    def poll_s(self) -> float:
        return min(0.5, self.timeout_s / 20)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if time.monotonic() - self._last > self.timeout_s:
                self._fire()

    def _fire(self) -> None:
        where = _main_thread_line()
        line = (
            f"rank {self.rank}: no step finished within train.hang_timeout_s={self.timeout_s:g} s "
            f"after step {self._step}; its main thread is at {where}"
        )
        if self.run_dir is not None:
            path = hang_dump_path(self.run_dir, self.rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as dump:
                dump.write(f"{line}\nEvery thread, most recent call first:\n")
                dump.flush()
                faulthandler.dump_traceback(dump, all_threads=True)
            line += f"; stacks in {path}"
            if self.nccl:
                line += self._dump_nccl()
        if self.error_dir is not None:
            report_rank_error(self.error_dir, HANG, line)
        else:
            print(f"birkhoff: {line}", file=sys.stderr, flush=True)
        # The peers waiting for this rank in a collective reach their deadlines within a poll
        # of this one; leaving earlier would break their collective before they dump.
        time.sleep(2 * self.poll_s + 0.5)
        os._exit(HANG_EXIT_CODE)

    def _dump_nccl(self) -> str:
        """The flight recorder's trace of this rank's collectives, next to the stacks."""
        dump_trace = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
        if dump_trace is None:
            return "; this torch has no NCCL flight recorder"
        path = self.run_dir / HANG_DIR / f"nccl-trace-rank-{self.rank}.pkl"
        path.write_bytes(dump_trace())
        return f"; NCCL flight recorder in {path}"


def _backstop_file():
    """The process's own stderr (fd 2) for faulthandler, which needs a real file descriptor:
    sys.stderr may be a capture without one (pytest, notebooks). None where there is none;
    the Python watchdog still runs."""
    stderr = sys.__stderr__
    try:
        stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return stderr


def _main_thread_line() -> str:
    """'file:line in function' of the innermost frame of the main thread."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "an unknown place (the main thread has no Python frame)"
    last = traceback.extract_stack(frame)[-1]
    return f"{last.filename}:{last.lineno} in {last.name}"
