"""What every DataLoader worker process does first."""

from __future__ import annotations

import os
import signal
import threading

# How often a worker checks that its rank is still alive.
ORPHAN_POLL_S = 0.5


def ignore_stop_signals(worker_id: int) -> None:
    """SIGTERM/SIGINT sent to the whole process group or job (SLURM's scancel and
    pre-emption, systemd, `timeout`, Ctrl-C) reach the workers too, but the trainer owns
    shutdown: it finishes its step and checkpoints, and the workers must serve it until then.

    A worker leaves the trainer's process group (a signal to the group, from `timeout`, a
    shell or Ctrl-C, no longer reaches it) and ignores SIGINT. SIGTERM is how the loader
    itself ends leftover workers (at exit it terminates and then waits for them), so it is
    blocked instead, and a thread takes each one with its sender's pid, ending the worker only
    when the sender is the process that started it.

    A worker whose rank died without stopping it (kill -9, a hang watchdog's exit) ends
    itself within ORPHAN_POLL_S: torch's own check leaves the worker waiting forever to flush
    prefetched batches into a pipe nobody reads, holding the rank's stdout, stderr and sockets
    open (so a launcher or an elastic restart waits on it)."""
    if os.getsid(0) != os.getpid():  # a spawned worker left on import (birkhoff/rank_children.py)
        os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later too
    owner = os.getppid()
    threading.Thread(
        target=_end_with_owner, args=(owner,), name="birkhoff-owner-watch", daemon=True
    ).start()


def _end_with_owner(owner: int) -> None:
    """Take each SIGTERM with its sender; between them, check the rank is still there."""
    while os.getppid() == owner:
        received = signal.sigtimedwait({signal.SIGTERM}, ORPHAN_POLL_S)
        if received is not None and received.si_pid == owner:
            os._exit(128 + signal.SIGTERM)  # what the default action would have done
    os._exit(0)  # orphaned; no exit handlers: they would wait on the unread pipe
