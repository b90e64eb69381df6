"""Every check and benchmark a lent GPU should run, in one command, each step in its own
process with its own time limit; writes one JSON file (and prints it) with each step's exit
code, seconds and output (parsed JSON where the step prints it). Steps:

  doctor        `birkhoff doctor --backend triton --json`: every Triton op (mHC read and merge,
                both Sinkhorn forms, V4 attention on FlexAttention) against the reference,
                forward and backward error, speed ratio; collectives; versions
  v4_attention  benchmarks/v4_attention_kernels.py: FlexAttention against the reference at
                V4-Flash shapes (time, peak memory, error)
  linear_ce     benchmarks/linear_cross_entropy.py: the head's loss at V4's vocabulary, the
                whole logits against the chunked reference and liger-kernel's fused op
  train_tiny    `birkhoff train model=tiny` for 30 steps with backend.kernels=triton and
                reference, bf16: tokens/s, MFU and loss of each (summary.json)

    python benchmarks/device_checks.py --out device_checks.json
    python benchmarks/device_checks.py --smoke   # on a CPU: the script itself, tiny steps
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).parent


def step(command: list[str], limit: int, summary: Path | None = None) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        result = {"returncode": done.returncode, "output_tail": done.stdout[-4000:]}
        if done.returncode != 0:
            result["error_tail"] = done.stderr[-4000:]
        result |= _parsed(done.stdout.strip())
    except subprocess.TimeoutExpired:
        result = {"returncode": None, "timed_out_after_s": limit}
    result["seconds"] = round(time.perf_counter() - start, 1)
    if summary is not None and summary.exists():
        keep = ("tokens_per_s", "mfu", "final_loss", "kernels", "compile", "median_step_s")
        saved = json.loads(summary.read_text())
        result["summary"] = {key: saved.get(key) for key in keep if key in saved}
    return result


def _parsed(text: str) -> dict:
    """The step's JSON: its whole output (doctor) or its last line (the benchmarks)."""
    for candidate in (text, text.splitlines()[-1] if text else ""):
        try:
            return {"json": json.loads(candidate)}
        except ValueError:
            continue
    return {}


def train(run_dir: Path, kernels: str, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "birkhoff.launch.cli", "train", f"hydra.run.dir={run_dir}",
        "model=tiny", f"train.steps={args.steps}", "train.eval_every=0", "checkpoint.every=0",
        f"backend.kernels={kernels}", "logging.console=plain", "optim.warmup_steps=1",
        *(["backend=cpu", "train.micro_batch_size=2", "train.global_batch_size=2"]
          if args.smoke else ["train.mixed_precision=bf16"]),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("device_checks.json"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny steps on a CPU")
    args = parser.parse_args()
    if args.smoke:
        args.steps = 2
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": args.smoke}
    doctor = [sys.executable, "-m", "birkhoff.launch.cli", "doctor", "--json"]
    results["doctor"] = step([*doctor, "--backend", "reference" if args.smoke else "triton"], 300)
    attention = [sys.executable, str(BENCHMARKS / "v4_attention_kernels.py")]
    results["v4_attention"] = step([*attention, *(["--smoke"] if args.smoke else [])], 400)
    loss = [sys.executable, str(BENCHMARKS / "linear_cross_entropy.py")]
    shape = ["--tokens", "64", "--hidden", "32", "--vocab", "1000"] if args.smoke else []
    for backend in ("reference",) if args.smoke else ("reference", "triton"):
        results[f"linear_ce_{backend}"] = step([*loss, *shape, "--backend", backend], 200)
    with tempfile.TemporaryDirectory() as scratch:
        for kernels in ("reference", "triton"):
            if args.smoke and kernels == "triton":
                continue  # Triton runs interpreted on a CPU: minutes for one step
            run_dir = Path(scratch) / kernels
            command = train(run_dir, kernels, args)
            results[f"train_tiny_{kernels}"] = step(command, 600, run_dir / "summary.json")
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
