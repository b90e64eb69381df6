"""The cpu backend's ops through their eager autograd Functions (what the model runs) against
the same ops through their torch custom ops, in one process: training steps (forward,
backward, AdamW) with the two taking turns step by step, each module attribute of
kernels/cpu_paths.py swapped between the Function and the custom op. The kernels and their
Python bodies are the same either way; what differs is torch.library's dispatch of each op
and of its backward op. Prints one JSON object: median step times and the median of the
paired ratios (eager step / the custom-op step next to it).

    python benchmarks/cpu_eager_path.py --model tiny --rounds 20
    python benchmarks/cpu_eager_path.py --model tiny --rounds 40 --shape 1 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from model_throughput import SHAPES, build, step

from birkhoff.kernels.cpu_paths import EAGER_PATHS
from birkhoff.train.host_malloc import apply_host_malloc

MODES = ("custom_op", "eager")


def use(mode: str, eager: dict) -> None:
    for module, attribute, op in EAGER_PATHS:
        setattr(module, attribute, op if mode == "custom_op" else eager[module, attribute])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--shape", nargs=2, type=int, metavar=("SEQUENCES", "TOKENS"))
    args = parser.parse_args()
    apply_host_malloc("reuse")
    torch.manual_seed(0)
    model, optimizer = build(args.model, [], False, "cpu", torch.device("cpu"))
    batch, seq = args.shape or SHAPES[args.model]
    tokens = torch.randint(0, 1000, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    eager = {(module, name): getattr(module, name) for module, name, _ in EAGER_PATHS}
    steps = {mode: [] for mode in MODES}
    try:
        for mode in MODES:  # warm-up
            use(mode, eager)
            step(model, optimizer, tokens, False)
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                use(mode, eager)
                start = time.perf_counter()
                step(model, optimizer, tokens, False)
                steps[mode].append(time.perf_counter() - start)
    finally:
        use("eager", eager)
    ratios = sorted(e / c for e, c in zip(steps["eager"], steps["custom_op"], strict=True))
    report = {
        "benchmark": "cpu_eager_path",
        "model": args.model,
        "tokens_per_step": batch * seq,
        "threads": torch.get_num_threads(),
        "step_ms": {m: round(statistics.median(t) * 1e3, 1) for m, t in steps.items()},
        "paired_ratio": round(ratios[len(ratios) // 2], 3),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
