"""train.weight_casts A/B: a bf16 step of K micro-batches with the weights' bf16 casts made once
(per_step, the trainer's on one device) against made by every micro-batch (per_micro_batch,
autocast alone), in one run.

Per model and mode: the step time (the two modes interleaved round by round, so machine noise
hits both alike) and the bytes the step's elementwise aten ops move outside the matmuls
(kernels/moved_bytes.py), with the casts' (`aten._to_copy`) and the gradient sums'
(`aten.add_`) apart, and the plan's bytes of casts and gradient sums for the same step
(parallel/planning/traffic.py: 6 bytes per weight-matrix element a forward cast, once a step
when kept, 6 a backward one, 12 an accumulation, 10 for the routed experts summed in their
kept casts).

    python benchmarks/weight_casts.py --models small --micro-batches 4

Prints one JSON object; per model `time_ratio` (per_step over per_micro_batch) and the bytes
per_step saves, counted (`saved_bytes`) and planned (`saved_bytes_planned`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
from model_throughput import SHAPES, build, loader_rows, step, synchronize

from birkhoff.kernels.moved_bytes import MovedBytes
from birkhoff.parallel.planning.cluster import cluster_from
from birkhoff.parallel.planning.estimate import GIB, estimate
from birkhoff.parallel.planning.inventory import build_inventory
from birkhoff.parallel.planning.layout import Layout, Workload

MODES = ("per_step", "per_micro_batch")
CLUSTER = cluster_from({"preset": "h100", "devices": 1})  # only its bytes are read, not times


def planned(net: torch.nn.Module, tokens: int, seq: int, micro_batches: int) -> dict[str, float]:
    """The plan's bytes of casts and gradient sums a step (traffic.py) for each mode, on one
    device: what differs between them (the activations' and clipping's are the same)."""
    inv = build_inventory(net.cfg)
    sequences = tokens // seq
    work = Workload(global_batch=sequences, seq_len=seq, kernels="reference")
    layout = Layout(micro_batch=sequences // micro_batches)
    out = {}
    for mode in MODES:
        got = estimate(inv, layout, replace(work, weight_casts=mode), CLUSTER).traffic_gib
        out[mode] = (got["casts"] + got["gradients"]) * GIB
    return out


def counted(net, optimizer, tokens, rows, micro_batches: int, mode: str) -> dict[str, int]:
    with MovedBytes() as moved:
        step(net, optimizer, tokens, True, rows, micro_batches, mode)
    by_name = moved.by_name
    return {"total": moved.total, "casts": by_name.get("aten._to_copy", 0),
            "gradient_sums": by_name.get("aten.add_", 0)}  # fmt: skip


def measure(model: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    batch, seq = args.shape or SHAPES[model]
    net, optimizer = build(model, args.set, False, args.kernels, device)
    tokens = torch.randint(0, net.cfg.vocab_size, (batch, seq + 1),
                           generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    rows = loader_rows(net, tokens)
    k = args.micro_batches
    for mode in MODES:  # the optimizer's state made, the allocator warmed
        step(net, optimizer, tokens, True, rows, k, mode)
    seconds = dict.fromkeys(MODES, 0.0)
    for _ in range(args.rounds):
        for mode in MODES:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(net, optimizer, tokens, True, rows, k, mode)
            synchronize(device)
            seconds[mode] += time.perf_counter() - start
    per_step = {m: s / (args.rounds * args.steps) for m, s in seconds.items()}
    result = {
        "tokens_per_step": k * batch * seq,
        "step_s": per_step,
        "time_ratio": per_step["per_step"] / per_step["per_micro_batch"],
    }
    if device.type == "cpu":  # the dispatch mode counts aten ops: the device's are the same
        bytes_ = {m: counted(net, optimizer, tokens, rows, k, m) for m in MODES}
        result["bytes"] = bytes_
        moved = {m: bytes_[m]["casts"] + bytes_[m]["gradient_sums"] for m in MODES}
        result["saved_bytes"] = moved["per_micro_batch"] - moved["per_step"]
        plan = planned(net, result["tokens_per_step"], seq, k)
        result["saved_bytes_planned"] = plan["per_micro_batch"] - plan["per_step"]
        totals = [bytes_[m]["total"] for m in MODES]
        result["total_bytes_ratio"] = totals[0] / totals[1]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small"], choices=list(SHAPES))
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode per round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels", default="reference", help="the kernel backend")
    parser.add_argument("--shape", nargs=2, type=int, metavar=("SEQUENCES", "TOKENS"))
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides")
    args = parser.parse_args()
    if args.micro_batches < 2:
        parser.error(f"--micro-batches {args.micro_batches}: give 2 or more (one is the same)")
    report = {
        "benchmark": "weight_casts",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "kernels": args.kernels,
        "micro_batches": args.micro_batches,
        "models": {m: measure(m, args) for m in args.models},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
