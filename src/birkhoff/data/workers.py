"""What every DataLoader worker process does first."""

from __future__ import annotations

import os
import signal
import threading


def ignore_stop_signals(worker_id: int) -> None:
    """SIGTERM/SIGINT sent to the whole process group or job (SLURM's scancel and
    pre-emption, systemd, `timeout`, Ctrl-C) reach the workers too, but the trainer owns
    shutdown: it finishes its step and checkpoints, and the workers must serve it until then.

    A worker leaves the trainer's process group (a signal to the group, from `timeout`, a
    shell or Ctrl-C, no longer reaches it) and ignores SIGINT. SIGTERM is how the loader
    itself ends leftover workers (at exit it terminates and then waits for them), so it is
    blocked instead, and a thread takes each one with its sender's pid, ending the worker only
    when the sender is the process that started it."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later too
    owner = os.getppid()
    threading.Thread(
        target=_end_on_sigterm_from, args=(owner,), name="birkhoff-sigterm", daemon=True
    ).start()


def _end_on_sigterm_from(owner: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == owner:
            os._exit(128 + signal.SIGTERM)  # what the default action would have done
