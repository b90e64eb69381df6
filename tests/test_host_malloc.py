"""backend.host_malloc: what the C allocator does with freed memory, measured by the kernel's
own count of page faults in a fresh process (the setting is process-wide)."""

import subprocess
import sys

import pytest

from birkhoff.train import host_malloc
from birkhoff.train.host_malloc import apply_host_malloc, glibc_version

# Six 16 MiB tensors alive at once, then freed, like a step's temporaries: 96 MiB free at the top
# of glibc's heap, more than its own trim threshold ever reaches (twice the largest block freed
# so far, 64 MiB at most). Prints the page faults per round after two rounds of warm-up.
CHURN = """
import resource, sys, torch
from birkhoff.train.host_malloc import apply_host_malloc
print(apply_host_malloc(sys.argv[1]))
def churn():
    blocks = [torch.ones(4 << 20) for _ in range(6)]
    del blocks
churn(); churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    churn()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def churn_faults(choice: str) -> tuple[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", CHURN, choice], capture_output=True, text=True, check=True
    )
    line, faults = result.stdout.strip().splitlines()
    return line, float(faults)


@pytest.mark.skipif(glibc_version() is None, reason="mallopt is glibc's")
def test_reuse_keeps_the_freed_pages_that_glibc_gives_back():
    """glibc's own thresholds give the freed memory back and fault it in again every round (up
    to 24,576 pages); with `reuse` a round takes its pages from the heap as they are. In about
    one process in five (measured here) glibc's heap happens not to be trimmable and keeps the
    memory by itself: `system` is sampled in up to six processes for one that gives it back."""
    reuse_line, reuse = churn_faults("reuse")
    assert reuse_line.startswith(f"host malloc: reuse ({glibc_version()}: blocks up to 32 MiB")
    assert reuse < 1000  # pages per round, of the 24,576 the tensors take
    for _ in range(6):
        system_line, system = churn_faults("system")
        if system > 12000:
            break
    assert system_line == "host malloc: system (the C library's own thresholds)"
    assert system > 12000, "glibc kept the memory in six processes: the test cannot tell"


def test_without_glibc_reuse_says_it_was_not_applied(monkeypatch):
    monkeypatch.setattr(host_malloc, "glibc_version", lambda: None)
    assert apply_host_malloc("reuse") == (
        "host malloc: reuse not applied: the C library is not glibc (no mallopt)"
    )
