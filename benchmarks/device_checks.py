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
  throughput_16b_class       the 16B-class shape below (one variant, triton kernels) with as
                      many of its 8 layers as the plan says fit this GPU's memory (all 8 on
                      an H200, fewer on an H100), 8 micro-batches of 8 x 1,024 tokens per
                      optimizer step (AdamW's pass over 6.6x the active parameters paid once
                      per 64K tokens, as a data-parallel rank of a large batch pays it;
                      the weights cast to bf16 once a step, train.weight_casts=per_step):
                      tokens/s, MFU
  v4_attention        benchmarks/v4_attention_kernels.py at V4-Flash shapes (4096 tokens)
  v4_attention_long_csa  the same for CSA at 16,384 tokens, where the picks are gathered:
                      the triton backend's gathered kernel against its FlexAttention mask form
  linear_ce_*         benchmarks/linear_cross_entropy.py at V4's vocabulary, reference and
                      triton (liger-kernel's fused op)
  throughput_small_compiled  `small` with train.compile's per-block inductor compilation

    python benchmarks/device_checks.py --out device_checks.json --budget-s 450
    python benchmarks/device_checks.py --smoke   # on a CPU: the script itself, tiny steps
"""

from __future__ import annotations

import argparse
import functools
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
BIG_SHAPE = (8, 1024)  # sequences x tokens of a micro-batch at the 16B-class shape
BIG_MICRO_BATCHES = 8
# model_throughput.py's step as the plan takes it: one GPU, bf16 autocast, AdamW (fused on
# CUDA: an NVIDIA preset), no checkpointing, the model's own layout, the micro-batches
# accumulated (the whole gradient is held while the next micro-batch's activations are)
BIG_PLAN = [
    "model=small", "optim=adamw_cosine", "cluster.preset=h100", "cluster.devices=1",
    f"train.global_batch_size={BIG_SHAPE[0] * BIG_MICRO_BATCHES}",
    f"train.micro_batch_size={BIG_SHAPE[0]}",
    f"data.seq_len={BIG_SHAPE[1]}", "train.mixed_precision=bf16",
    "parallel.activation_checkpoint=none", "parallel.dp_shard=1",
]  # fmt: skip
MEMORY_MARGIN = 0.92  # of the GPU's memory: the allocator's fragmentation, CUDA's context


@functools.cache  # fitting_layers and the results both ask for the chosen count
def planned_gib(layers: int) -> float:
    """The plan's peak memory per device for the 16B-class step at `layers` layers (it
    predicted the H200 run's 97.1 GiB peak exactly, README)."""
    from birkhoff.launch.plan_command import cluster_values, recipe_layout, workload_of
    from birkhoff.launch.recipe import compose_recipe, typed_recipe
    from birkhoff.parallel.planning.cluster import cluster_from
    from birkhoff.parallel.planning.estimate import estimate
    from birkhoff.parallel.planning.inventory import build_inventory

    overrides = [*BIG_PLAN, *SHAPE_16B_CLASS, *layer_count(layers)]
    recipe = typed_recipe(compose_recipe(overrides))
    cluster = cluster_from(cluster_values(recipe))
    layout = recipe_layout(recipe, cluster.devices)
    work = workload_of(recipe)
    return estimate(build_inventory(recipe.model), layout, work, cluster).memory_gib["total"]


def layer_count(layers: int) -> list[str]:
    """Overrides for the shape at `layers` (4 or more) layers, Engram where the 8-layer shape
    has it (the 2nd layer and the second from the end)."""
    return [f"model.num_layers={layers}", f"model.engram.layers=[1,{layers - 2}]"]


def fitting_layers(device_gib: float, most: int = 8) -> int | None:
    """The most layers (up to `most`) whose planned peak is within MEMORY_MARGIN of the
    device's memory; None where not even 4 fit."""
    for layers in range(most, 3, -1):
        if planned_gib(layers) <= MEMORY_MARGIN * device_gib:
            return layers
    return None


def gpu_memory_gib() -> float | None:
    """The first GPU's memory from nvidia-smi (not torch: a CUDA context made here would
    hold memory through every step); None without one."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        return float(done.stdout.split()[0]) / 1024 if done.returncode == 0 else None
    except (IndexError, ValueError):  # no line, or "[N/A]"
        return None


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
    if args.big_layers is not None:
        widths = [*widths, *layer_count(args.big_layers)]
    big = ["--variants", "default", "--kernels", args.kernels, "--profile"]
    big += ["--micro-batches", str(args.big_micro_batches), "--set", *widths]
    big_class = throughput("small", BIG_SHAPE, big, args.smoke)
    steps.append(("throughput_16b_class", big_class, 240, None))
    attention = [sys.executable, str(BENCHMARKS / "v4_attention_kernels.py")]
    attention += ["--smoke"] if args.smoke else ["--lengths", "4096"]
    steps.append(("v4_attention", attention, 150, None))
    # CSA at 16K tokens, where the picks are gathered: the kernel against FlexAttention's mask
    long_csa = [*attention[:2], "--kinds", "csa", "--csa-forms"]
    long_csa += ["--smoke"] if args.smoke else ["--lengths", "16384", "--no-reference"]
    steps.append(("v4_attention_long_csa", long_csa, 120, None))
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
    parser.add_argument(
        "--big-layers",
        type=int,
        help="layers of the 16B-class shape (default: the most the plan fits in the GPU)",
    )
    args = parser.parse_args()
    if args.big_layers is not None and args.big_layers < 4:
        parser.error(f"--big-layers {args.big_layers}: give 4 or more (Engram's two layers)")
    args.kernels = "reference" if args.smoke else "triton"
    args.big_micro_batches = 2 if args.smoke else BIG_MICRO_BATCHES
    if args.smoke:
        args.steps = 2
    deadline = time.perf_counter() + args.budget_s
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": args.smoke, "skipped": []}
    device_gib = None if args.smoke else gpu_memory_gib()
    left_out = set()  # steps that could only fail here
    if args.big_layers is None and device_gib is not None:
        args.big_layers = fitting_layers(device_gib)
        if args.big_layers is None:  # not even 4 layers fit: it could only run out of memory
            left_out.add("throughput_16b_class")
    chosen = args.big_layers
    results["big_shape"] = {
        "gpu_memory_gib": device_gib,
        "layers": chosen,  # None: the shape's own 8 (no GPU seen, a smoke run) or none fits
        "planned_gib": None if chosen is None or args.smoke else round(planned_gib(chosen), 1),
        "micro_batches": args.big_micro_batches,
        "left_out": bool(left_out),
    }
    with tempfile.TemporaryDirectory() as scratch:
        for name, command, limit, summary in plan(args, Path(scratch)):
            left = deadline - time.perf_counter()
            if name in left_out or (args.only and name not in args.only) or left < min(limit, 60):
                results["skipped"].append(name)
                continue
            print(f"[device_checks] {name} (limit {min(limit, left):.0f} s)", file=sys.stderr)
            results[name] = step(command, min(limit, left), summary)
            args.out.write_text(json.dumps(results, indent=1))
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
