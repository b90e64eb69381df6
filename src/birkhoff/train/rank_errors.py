"""How a rank of a multi-rank run reports why it stopped, so that the launcher prints each
reason once instead of every rank's traceback.

A rank that fails on purpose (a refused checkpoint, bad data, a diverged run) leaves its
one-line message; any other failure leaves its traceback. The ranks that fail only because a
peer is gone (a collective broke) leave tracebacks too, but the launcher shows tracebacks
only when no rank gave a reason. A rank whose hang watchdog fired leaves where it was stuck
(train/watchdog.py); those lines come first, from every rank that left one.
"""

from __future__ import annotations

import os
from pathlib import Path

from birkhoff.atomic import write_text_atomic
from birkhoff.checkpoint.errors import CheckpointError
from birkhoff.data.sources import DataError
from birkhoff.errors import RecipeError
from birkhoff.train.failures import TrainingError

EXPECTED_ERRORS = (RecipeError, DataError, CheckpointError, TrainingError)
EXPECTED, UNEXPECTED, HANG = "reason", "traceback", "hang"


def report_rank_error(error_dir: str, kind: str, text: str) -> None:
    rank = os.environ.get("RANK", "0")
    write_text_atomic(Path(error_dir) / f"rank-{int(rank):05d}.{kind}", text)


def clear_rank_errors(error_dir: str) -> None:
    """Remove what this rank left in an earlier attempt of the same job."""
    rank = int(os.environ.get("RANK", "0"))
    for file in Path(error_dir).glob(f"rank-{rank:05d}.*"):
        file.unlink(missing_ok=True)


def rank_errors(error_dir: str) -> tuple[list[str], list[str], list[str]]:
    """(each hung rank's line, the distinct reasons, in rank order; 'rank N:' and a traceback
    per other failure)."""
    hangs: list[str] = []
    reasons: list[str] = []
    tracebacks: list[str] = []
    for file in sorted(Path(error_dir).glob("rank-*")):
        text = file.read_text().strip()
        if file.suffix == f".{HANG}":
            hangs.append(text)
        elif file.suffix == f".{EXPECTED}":
            if text not in reasons:
                reasons.append(text)
        else:
            tracebacks.append(f"rank {int(file.stem.split('-')[1])}:\n{text}")
    return hangs, reasons, tracebacks
