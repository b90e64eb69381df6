"""Stopping cleanly on SIGTERM or SIGINT: the current step finishes, every rank agrees to stop
after the same step, a checkpoint is written, and the run ends with its summary."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch

from birkhoff.parallel.distributed import DistributedContext

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Records SIGTERM/SIGINT instead of dying; `requested` is agreed over all ranks."""

    def __init__(self) -> None:
        self.received: int | None = None  # on this rank
        self.agreed: int | None = None  # on any rank (the highest signal number)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def requested(self, ctx: DistributedContext) -> bool:
        """True on every rank once any rank got a signal (one scalar all-reduce, which also
        tells every rank the signal's number)."""
        flag = torch.tensor(float(self.received or 0))
        self.agreed = int(ctx.all_reduce_max(flag, None).item()) or None
        return self.agreed is not None

    def _record(self, number: int, frame: FrameType | None) -> None:
        self.received = number
