"""How the host's C allocator treats freed memory (`backend.host_malloc`), set once per rank
process before the model is built.

glibc's malloc serves blocks above its mmap threshold with fresh mappings and gives memory at the
top of its heap back to the system once more than its trim threshold is free there. Both
thresholds move by themselves (from 128 KiB up to the size of the largest mapped block freed so
far, 32 MiB at most; the trim threshold at twice that), and a training step frees and allocates
tens of megabytes at a time: the memory it gets back is new to the process, and every page of it
faults on first touch (the kernel maps and zeroes it). A `small` step on a CPU took ~100,000
page faults with mHC (Engram's 16 MiB tables, their gradients and AdamW's temporaries) and ran
1.19x faster with `reuse` (README, benchmarks/host_malloc.py).

`reuse` fixes both thresholds: blocks up to 32 MiB (glibc's largest allowed threshold) come from
the heap, and the heap is trimmed only when more than 1 GiB is free at its top, so a step reuses
the pages the previous one freed. `system` leaves glibc's own behaviour. Memory above the
thresholds (bigger tensors, checkpoint staging) is mapped and returned as before.
"""

from __future__ import annotations

import ctypes
import os

CHOICES = ("reuse", "system")
# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30


def glibc_version() -> str | None:
    """ "glibc 2.x" where the C library is glibc, else None (musl, macOS, Windows)."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return version or None


def apply_host_malloc(choice: str) -> str:
    """Sets the C allocator as `choice` says, for this process; returns the line the trainer
    prints (what was set, or why nothing was)."""
    if choice == "system":
        return "host malloc: system (the C library's own thresholds)"
    version = glibc_version()
    if version is None:
        return "host malloc: reuse not applied: the C library is not glibc (no mallopt)"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    refused = [
        name
        for name, parameter, value in (
            ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        )
        if mallopt(parameter, value) != 1
    ]
    if refused:
        return f"host malloc: reuse not applied: {version} refused {', '.join(refused)}"
    return (
        f"host malloc: reuse ({version}: blocks up to {MMAP_THRESHOLD_BYTES >> 20} MiB from "
        f"the heap, trimmed above {TRIM_THRESHOLD_BYTES >> 30} GiB free)"
    )
