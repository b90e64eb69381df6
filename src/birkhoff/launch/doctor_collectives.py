"""The collectives `birkhoff doctor` runs among this machine's local ranks: each of
all_reduce, all_to_all_single, reduce_scatter_single and broadcast on a 16 MiB float32
buffer, checked against the values it must produce and timed (the best of a few rounds after
a warm-up), reported as bus bandwidth (the bytes each rank's links carry per second, as
nccl-tests count them, so every collective reads on one scale)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from birkhoff.parallel.device import COLLECTIVE_BACKENDS

PAYLOAD_BYTES = 16 * 2**20
ROUNDS = 5


def local_collectives(device_type: str, ranks: int) -> dict[str, dict]:
    """Per collective: ok, an error if not, and bus bandwidth in GB/s, among `ranks` local
    processes on `device_type` (gloo on CPU, nccl on CUDA, hccl on Ascend)."""
    with tempfile.TemporaryDirectory(prefix="birkhoff-doctor-") as tmp:
        out = Path(tmp)
        mp.start_processes(
            _rank_main, args=(ranks, device_type, str(out)), nprocs=ranks, start_method="spawn"
        )
        return json.loads((out / "rank0.json").read_text())


def _rank_main(rank: int, ranks: int, device_type: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    store = dist.FileStore(str(Path(out) / "store"), ranks)
    backend = COLLECTIVE_BACKENDS[device_type]
    dist.init_process_group(backend, store=store, rank=rank, world_size=ranks)
    device = torch.device(device_type, rank) if device_type != "cpu" else torch.device("cpu")
    if device_type != "cpu":
        torch.accelerator.set_device_index(rank)
    try:
        results = {name: _probe(name, rank, ranks, device) for name in PROBES}
    finally:
        dist.destroy_process_group()
    if rank == 0:
        (Path(out) / "rank0.json").write_text(json.dumps(results))


def _all_reduce(rank, ranks, x):
    x.fill_(rank + 1)
    dist.all_reduce(x)
    return x, ranks * (ranks + 1) / 2, 2 * (ranks - 1) / ranks


def _all_to_all(rank, ranks, x):
    x.fill_(rank)  # chunk j of every rank goes to rank j: rank r receives 0, 1, ..., ranks - 1
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    expected = torch.arange(ranks, dtype=x.dtype, device=x.device).repeat_interleave(
        x.numel() // ranks
    )
    return out - expected, 0.0, (ranks - 1) / ranks


def _reduce_scatter(rank, ranks, x):
    x.fill_(rank + 1)
    out = torch.empty(x.numel() // ranks, dtype=x.dtype, device=x.device)
    dist.reduce_scatter_single(out, x)
    return out, ranks * (ranks + 1) / 2, (ranks - 1) / ranks


def _broadcast(rank, ranks, x):
    x.fill_(7.0 if rank == 0 else 0.0)
    dist.broadcast(x, src=0)
    return x, 7.0, 1.0


PROBES = {
    "all_reduce": _all_reduce,
    "all_to_all_single": _all_to_all,
    "reduce_scatter": _reduce_scatter,
    "broadcast": _broadcast,
}


def _probe(name: str, rank: int, ranks: int, device: torch.device) -> dict:
    """One collective: correct on every rank (agreed by an all_reduce of the errors), and its
    best time over the rounds as bus bandwidth."""
    x = torch.empty(PAYLOAD_BYTES // 4, dtype=torch.float32, device=device)
    best = float("inf")
    error = 0.0
    for round_ in range(ROUNDS + 1):
        dist.barrier()
        start = time.perf_counter()
        got, expected, bus_factor = PROBES[name](rank, ranks, x)
        if device.type != "cpu":
            torch.accelerator.synchronize()
        seconds = time.perf_counter() - start
        if round_:  # the first round is the warm-up
            best = min(best, seconds)
        error = max(error, (got - expected).abs().max().item())
    agreed = torch.tensor(error, dtype=torch.float64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    ok = agreed.item() == 0.0
    return {
        "ok": ok,
        "max_error": agreed.item(),
        "bus_gbps": PAYLOAD_BYTES * bus_factor / best / 1e9,
        "payload_mib": PAYLOAD_BYTES / 2**20,
    }
