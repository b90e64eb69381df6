"""backend.host_malloc: training throughput and page faults with glibc's own allocator
thresholds (`system`) against `reuse` (train/host_malloc.py), in one run.

The setting is process-wide and cannot be undone inside a process, so each measurement is one
run of benchmarks/model_throughput.py in a process of its own, the two settings alternating
(`--repeats` times each); per variant it reports the median tokens/s and page faults per step of
each setting and the ratio reuse / system. Prints one JSON object.

    python benchmarks/host_malloc.py --models small --variants default plain --repeats 2
    python benchmarks/host_malloc.py --models tiny --variants default dense plain
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

THROUGHPUT = Path(__file__).with_name("model_throughput.py")
SETTINGS = ("system", "reuse")


def run_throughput(model: str, variants: list[str], setting: str, args) -> dict:
    command = [sys.executable, str(THROUGHPUT), "--models", model, "--variants", *variants,
               "--rounds", str(args.rounds), "--steps", str(args.steps),
               "--host-malloc", setting]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["models"][model]


def compare(model: str, args) -> dict:
    runs = {setting: [] for setting in SETTINGS}
    for _ in range(args.repeats):
        for setting in SETTINGS:
            runs[setting].append(run_throughput(model, args.variants, setting, args))

    def median(read) -> dict[str, float]:  # per setting, over its processes
        return {setting: statistics.median(map(read, results)) for setting, results in runs.items()}

    out: dict = {}
    for variant in args.variants:
        tokens = median(lambda r, v=variant: r["tokens_per_s"][v])
        out[variant] = {
            "tokens_per_s": tokens,
            "page_faults_per_step": median(lambda r, v=variant: r["page_faults_per_step"][v]),
            "speedup_reuse_over_system": tokens["reuse"] / tokens["system"],
        }
    for metric in ("mhc_overhead", "over_dense_per_token"):
        if metric in runs["reuse"][0]:
            out[metric] = median(lambda r, m=metric: r[m])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--variants", nargs="+", default=["default", "plain"])
    parser.add_argument("--repeats", type=int, default=2, help="processes per setting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    report = {
        "benchmark": "host_malloc",
        "repeats": args.repeats,
        "models": {model: compare(model, args) for model in args.models},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
