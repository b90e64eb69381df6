"""One run at a time in a run dir: a lock file, created atomically, naming its holder.

Two runs started into one dir would both append to metrics.jsonl and replace each other's
checkpoints. The lock is made whole under a temporary name and hard-linked into place (atomic,
and it fails if the lock exists, also on NFS). A lock whose holder died without releasing it
(kill -9, a lost node) is taken over when the holder was on this host and its process is gone;
a holder on another host cannot be checked from here, so the message says how to clear it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from birkhoff.errors import RecipeError

LOCK_FILE = ".birkhoff.lock"


def _start_ticks(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict[str, Any]) -> bool:
    pid = int(holder.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    started = holder.get("start_ticks")
    return started is None or _start_ticks(pid) in (None, started)


class RunDirLock:
    """Held from before the run writes anything until it ends. `acquire` is a no-op when this
    process or its parent (the launcher of this node's ranks) already holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.owned = False

    def acquire(self) -> None:
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_ticks": _start_ticks(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed, then taken like a free one
            if self._create(me):
                self.owned = True
                return
            holder = self._holder()
            if holder is None:
                continue  # released between our attempt and the read
            on_this_host = holder.get("host") == me["host"]
            if on_this_host and holder.get("pid") in (os.getpid(), os.getppid()):
                return
            if on_this_host and not _alive(holder):
                self._remove_stale(holder)
                continue
            raise RecipeError(
                "hydra.run.dir",
                str(self.path.parent),
                f"is in use by process {holder.get('pid')} on {holder.get('host')} since "
                f"{holder.get('since')} ({self.path}); wait for that run to end or use another "
                "dir (if that run is dead on another host, delete the lock file)",
            )
        raise RecipeError("hydra.run.dir", str(self.path.parent), "its lock keeps changing")

    def release(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _create(self, me: dict[str, Any]) -> bool:
        temporary = self.path.with_name(f"{self.path.name}.{me['host']}.{me['pid']}")
        temporary.write_text(json.dumps(me) + "\n")
        try:
            os.link(temporary, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            temporary.unlink(missing_ok=True)

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {"host": "?", "pid": "?", "since": "? (unreadable lock)"}

    def _remove_stale(self, holder: dict[str, Any]) -> None:
        """Remove the lock only if it still names the dead holder (another process may have
        replaced it meanwhile): rename it aside first, then check what was renamed."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path, aside)
            if json.loads(aside.read_text()) != holder:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)  # not ours to remove: put it back
            aside.unlink()
