"""Which rank holds the others back.

A rank's wall-clock step time says nothing about that: every synchronous collective makes the
fast ranks wait for the slow one, so all ranks report the same step time. What differs is the
time a rank spends on its own work. On CPU devices that is the CPU time of the rank's process
outside the data fetch (gloo blocks without spinning, so a rank waiting in a collective adds
almost none) plus the wall time it waited for its next batch. On accelerators the host's CPU
time includes its wait for the device (which waits in the collectives), so only the data wait
is compared there, and the trainer says so at start.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from birkhoff.parallel import DistributedContext


@dataclass
class RankTime:
    """Seconds of a rank's own work over a window of steps."""

    cpu_s: float = 0.0
    data_wait_s: float = 0.0

    @property
    def own_s(self) -> float:
        return self.cpu_s + self.data_wait_s


def slowest(times: list[RankTime]) -> tuple[int, float]:
    """The rank with the most own time, and its own time over the median of the others'
    (with two ranks, the other rank's)."""
    own = [t.own_s for t in times]
    rank = max(range(len(own)), key=own.__getitem__)
    others = statistics.median(own[:rank] + own[rank + 1 :])
    return rank, own[rank] / others if others > 0 else float("inf")


class StragglerMonitor:
    """Sums each rank's own time per step; every `every` steps (and at the last) one small
    all-gather over all ranks gives the metrics `slowest_rank` and `slowest_over_median`, and
    a console line when the ratio reaches `warn_ratio` (None: no warning)."""

    def __init__(
        self,
        ctx: DistributedContext,
        device: torch.device,
        every: int,
        warn_ratio: float | None,
    ) -> None:
        self.ctx = ctx
        self.every = every
        self.warn_ratio = warn_ratio
        self.counts_cpu = device.type == "cpu"
        self.window = RankTime()
        self.window_first_step = 1
        if ctx.world_size > 1 and not self.counts_cpu and ctx.is_main:
            print(
                f"birkhoff: straggler metrics on {device.type} compare data wait only "
                "(a rank's device compute time is not measured)",
                flush=True,
            )

    def add(self, cpu_s: float, data_wait_s: float) -> None:
        self.window.cpu_s += cpu_s if self.counts_cpu else 0.0
        self.window.data_wait_s += data_wait_s

    def report(self, step: int, last: bool) -> dict[str, float]:
        """Called by every rank after every applied step (the step and `last` agree)."""
        if self.ctx.world_size == 1 or not (last or step % self.every == 0):
            return {}
        mine = torch.tensor([self.window.cpu_s, self.window.data_wait_s], dtype=torch.float64)
        gathered = torch.empty(2 * self.ctx.world_size, dtype=torch.float64, device=self.ctx.device)
        dist.all_gather_into_tensor(gathered, mine.to(self.ctx.device))
        times = [RankTime(cpu, wait) for cpu, wait in gathered.view(-1, 2).tolist()]
        rank, ratio = slowest(times)
        if self.ctx.is_main and self.warn_ratio is not None and ratio >= self.warn_ratio:
            t = times[rank]
            print(
                f"birkhoff: rank {rank} is a straggler over steps {self.window_first_step}-"
                f"{step}: {ratio:.2f}x the other ranks' median own time ({t.cpu_s:.2f} s CPU + "
                f"{t.data_wait_s:.2f} s data wait; train.straggler_warn_ratio={self.warn_ratio})",
                file=sys.stderr,
                flush=True,
            )
        self.window, self.window_first_step = RankTime(), step + 1
        return {"slowest_rank": rank, "slowest_over_median": ratio}
