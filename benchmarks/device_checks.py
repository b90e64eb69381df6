"""Every check and benchmark a lent GPU should run, in one command, each step in its own
process with its own time limit, most important first, within one overall budget (a step
starts only with time left for it; its limit is cut to what is left). The JSON file is
rewritten after every step, so a run stopped from outside still leaves what it finished.
Each step records its exit code, seconds and output (parsed JSON where it prints it). Steps:

  doctor              `birkhoff doctor --backend triton --json`: every Triton op against the
                      reference (forward and backward error, speed ratio); collectives; versions
  throughput_tiny     benchmarks/model_throughput.py on the device, bf16: tiny with mHC and with
                      the plain residual, reference and triton kernels, one process: tokens/s,
                      MFU, mHC overhead, kernel launches per step
  throughput_small    the same at `small`, 8 x 1024 tokens per step
  train_tiny_*        `birkhoff train model=tiny`, 30 steps, bf16, kernels triton and reference:
                      the trainer end to end (summary.json: tokens/s, MFU, loss)
  throughput_16b_class       the 16B-class shape below (one variant, triton kernels): MFU
  v4_attention        benchmarks/v4_attention_kernels.py at V4-Flash shapes (4096 tokens)
  linear_ce_*         benchmarks/linear_cross_entropy.py at V4's vocabulary, reference and
                      triton (liger-kernel's fused op)
  throughput_small_compiled  `small` with train.compile's per-block inductor compilation

    python benchmarks/device_checks.py --out device_checks.json --budget-s 450
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
CLI = [sys.executable, "-m", "birkhoff.launch.cli"]
# DeepSeek-V2-Lite's widths (hidden 2048, 64 routed experts of 1408, top-6, 2 shared, a
# dense first layer of 10944) at 8 layers: 5.2B parameters (0.79B active), whose fp32
# weights, gradients and AdamW state fit one 141 GB GPU; 27 layers (15.7B) would not.
SHAPE_16B_CLASS = [
    "model.hidden_size=2048", "model.num_layers=8", "model.num_heads=16",
    "model.num_kv_heads=4", "model.ffn_hidden_size=10944", "model.moe.num_experts=64",
    "model.moe.top_k=6", "model.moe.num_shared_experts=2",
    "model.moe.expert_ffn_hidden_size=1408", "model.engram.table_size=100000",
    "model.engram.embed_dim=128",
]  # fmt: skip


def step(command: list[str], limit: float, summary: Path | None = None) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        result = {"returncode": done.returncode, "output_tail": done.stdout[-3000:]}
        if done.returncode != 0:
            result["error_tail"] = done.stderr[-3000:]
        result |= _parsed(done.stdout.strip())
        if "json" in result:
            del result["output_tail"]  # the same, parsed
    except subprocess.TimeoutExpired as stopped:
        result = {"returncode": None, "timed_out_after_s": round(limit)}
        result["error_tail"] = (stopped.stderr or b"")[-2000:].decode(errors="replace")
    result["seconds"] = round(time.perf_counter() - start, 1)
    if summary is not None and summary.exists():
        keep = ("tokens_per_s", "mfu", "final_loss", "kernels", "compile", "median_step_s")
        saved = json.loads(summary.read_text())
        result["summary"] = {key: saved.get(key) for key in keep if key in saved}
    return result


def _parsed(text: str) -> dict:
    """The step's JSON: its whole output (doctor, model_throughput) or its last line."""
    for candidate in (text, text.splitlines()[-1] if text else ""):
        try:
            return {"json": json.loads(candidate)}
        except ValueError:
            continue
    return {}


def train(run_dir: Path, kernels: str, args: argparse.Namespace) -> list[str]:
    return [
        *CLI, "train", f"hydra.run.dir={run_dir}", "model=tiny", f"train.steps={args.steps}",
        "train.eval_every=0", "checkpoint.every=0", f"backend.kernels={kernels}",
        "logging.console=plain", "optim.warmup_steps=1",
        *(["backend=cpu", "train.micro_batch_size=2", "train.global_batch_size=2"]
          if args.smoke else ["train.mixed_precision=bf16"]),
    ]  # fmt: skip


def throughput(models: str, shape: tuple[int, int], extra: list[str], smoke: bool) -> list[str]:
    """model_throughput.py on the GPU in bf16 at `shape`; on a CPU (smoke) 2 x 32 tokens."""
    where = ["--shape", "2", "32"] if smoke else ["--device", "cuda", "--bf16", "--shape"]
    where += [] if smoke else [str(n) for n in shape]
    repeats = "1" if smoke else "3"
    script = [sys.executable, str(BENCHMARKS / "model_throughput.py"), "--models", models]
    return [*script, *where, "--rounds", repeats, "--steps", repeats, *extra]


def plan(args: argparse.Namespace, scratch: Path) -> list[tuple[str, list[str], int, Path | None]]:
    """(name, command, limit in seconds, summary file) per step, most important first."""
    kernels = ["--kernels", "reference"] if args.smoke else ["--kernels", "reference", "triton"]
    mhc = ["--variants", "default", "plain", "--launches", "--profile", *kernels]
    steps = [("doctor", [*CLI, "doctor", "--json", "--backend", args.kernels], 150, None)]
    steps.append(("throughput_tiny", throughput("tiny", (32, 256), mhc, args.smoke), 150, None))
    steps.append(("throughput_small", throughput("small", (8, 1024), mhc, args.smoke), 180, None))
    for kernels in ("reference",) if args.smoke else ("triton", "reference"):
        run_dir = scratch / kernels  # Triton runs interpreted on a CPU: minutes for one step
        command = train(run_dir, kernels, args)
        steps.append((f"train_tiny_{kernels}", command, 150, run_dir / "summary.json"))
    # on a CPU the same command with small's own widths (seconds, not minutes)
    widths = ["model.num_layers=8"] if args.smoke else SHAPE_16B_CLASS
    big = ["--variants", "default", "--kernels", args.kernels, "--profile", "--set", *widths]
    big_class = throughput("small", (8, 1024), big, args.smoke)
    steps.append(("throughput_16b_class", big_class, 240, None))
    attention = [sys.executable, str(BENCHMARKS / "v4_attention_kernels.py")]
    attention += ["--smoke"] if args.smoke else ["--lengths", "4096"]
    steps.append(("v4_attention", attention, 150, None))
    loss = [sys.executable, str(BENCHMARKS / "linear_cross_entropy.py")]
    shape = ["--tokens", "64", "--hidden", "32", "--vocab", "1000"] if args.smoke else []
    for backend in ("reference",) if args.smoke else ("reference", "triton"):
        steps.append((f"linear_ce_{backend}", [*loss, *shape, "--backend", backend], 90, None))
    if not args.smoke:  # cold compiles: minutes on a 2-core CPU, > 4 on an H200
        compiled = ["--variants", "default", "plain", "--compile", "--kernels", "reference"]
        small_compiled = throughput("small", (8, 1024), compiled, args.smoke)
        steps.append(("throughput_small_compiled", small_compiled, 240, None))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("device_checks.json"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=3600, help="all steps together")
    parser.add_argument("--only", nargs="*", help="run only these steps (names as above)")
    parser.add_argument("--smoke", action="store_true", help="tiny steps on a CPU")
    args = parser.parse_args()
    args.kernels = "reference" if args.smoke else "triton"
    if args.smoke:
        args.steps = 2
    deadline = time.perf_counter() + args.budget_s
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": args.smoke, "skipped": []}
    with tempfile.TemporaryDirectory() as scratch:
        for name, command, limit, summary in plan(args, Path(scratch)):
            left = deadline - time.perf_counter()
            if (args.only and name not in args.only) or left < min(limit, 60):
                results["skipped"].append(name)
                continue
            print(f"[device_checks] {name} (limit {min(limit, left):.0f} s)", file=sys.stderr)
            results[name] = step(command, min(limit, left), summary)
            args.out.write_text(json.dumps(results, indent=1))
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
