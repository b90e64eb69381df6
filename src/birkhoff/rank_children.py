"""Processes a rank starts through multiprocessing leave the rank's process group.

A signal to the whole process group (SLURM's scancel and pre-emption, systemd, `timeout`, a
shell's Ctrl-C) must reach the rank, which finishes its step and checkpoints, but not the
processes serving that checkpoint: DCP's checkpoint process (`checkpoint.async_mode=process`)
died of it, and the stop's save with it. DCP gives no hook in its process, and CPython
clears a blocked-signal mask when it spawns one, so the process leaves the group itself:
every process multiprocessing spawns imports the main module first, which is `birkhoff`'s
CLI, and importing the `birkhoff` package calls `leave_rank_process_group` before anything
else (the process is exposed only while the interpreter starts, tens of milliseconds). The
rank marks itself for the duration of the run; only its direct children act on the mark.
Loader workers, forked or spawned, leave the group in data/workers.py too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

RANK_PID_ENV = "BIRKHOFF_RANK_PID"


@contextmanager
def rank_process_marked() -> Iterator[None]:
    """Children started while this runs know they belong to this rank."""
    previous = os.environ.get(RANK_PID_ENV)
    os.environ[RANK_PID_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RANK_PID_ENV, None)
        else:
            os.environ[RANK_PID_ENV] = previous


def leave_rank_process_group() -> None:
    """In a direct child of a rank that imports the CLI (what multiprocessing's spawn does
    before it runs the target): start a session of its own. A no-op anywhere else, and in a
    process that already leads one. (Spawn restores the parent's sys.argv before it imports
    the main module, so the mark and the parent pid are what identify such a child.)"""
    started_by_rank = os.environ.get(RANK_PID_ENV) == str(os.getppid())
    if started_by_rank and os.getsid(0) != os.getpid():
        os.setsid()
