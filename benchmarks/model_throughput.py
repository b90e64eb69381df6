"""Training throughput of the model variants, measured in one run (ratios, not absolute times).

For each model recipe it times forward + backward + AdamW on synthetic tokens for:
  default (mHC + MoE + Engram as in the recipe), plain (residual.mode=plain), no_engram
(engram.layers=[]), v4_attention and gqa_attention (attention.kind); variants are interleaved
round by round so machine noise hits all alike. Engram's table rows are hashed before the
timing, as the trainer's loader hashes them on the host (data.engram_in_loader, the default).
Prints one JSON object: tokens/s per variant,
mHC overhead = time(mHC)/time(plain) - 1, Engram overhead = time(Engram)/time(no Engram) - 1,
V4 attention cost = time(V4 attention)/time(GQA) - 1, and with --profile the top ops of the
default. `--variants default dense` (tiny only) times the model's dense baseline recipe of
equal active size (`tiny_dense`) in the same rounds: time per token over the dense one's - 1.
`--compile` compiles every variant's blocks with inductor (train.compile's per-block
compilation) and warms them up before timing; `--variants` picks some.

On an accelerator (`--device cuda`) the same run takes the kernel backends to compare
(`--kernels reference triton`: every variant built once per backend, ratios per backend),
bf16 autocast (`--bf16`), a step shape (`--shape SEQUENCES TOKENS`) and recipe overrides for
every variant (`--set model.hidden_size=2048 ...`); it reports MFU against the device's bf16
peak (train/mfu.py), peak memory, and with `--launches` the device kernels one step launches
(profiler events on the device; on a CPU the aten calls instead). `--micro-batches K`
accumulates K forwards and backwards per optimizer step (the trainer's gradient accumulation):
tokens/s and MFU then count K x the batch per step, and the optimizer's pass over every
parameter is paid once per K (the launches and the profile stay those of one micro-batch);
under `--bf16` the weights are cast once for the K (`--weight-casts per_step`, the trainer's
train.weight_casts on one device) or by each (`per_micro_batch`).

The host's allocator is set as the trainer sets it (`--host-malloc`, backend.host_malloc,
train/host_malloc.py: `reuse` by default) and each variant's page faults per timed step are
reported; benchmarks/host_malloc.py compares the two settings process by process.

    python benchmarks/model_throughput.py --models tiny small --rounds 3
    python benchmarks/model_throughput.py --models small --variants default plain --compile
    python benchmarks/model_throughput.py --models small --variants default plain \
        --kernels reference cpu
    python benchmarks/model_throughput.py --device cuda --bf16 --kernels reference triton \
        --models small --shape 8 1024 --variants default plain --launches
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from birkhoff.launch.recipe import load_recipe
from birkhoff.model import build_model
from birkhoff.model.budget import count_parameters
from birkhoff.parallel.compile import compile_blocks
from birkhoff.parallel.parallelize import block_slots
from birkhoff.train.host_malloc import CHOICES as HOST_MALLOC
from birkhoff.train.host_malloc import apply_host_malloc
from birkhoff.train.mfu import device_peak, flops_per_token
from birkhoff.train.model_share import initialise
from birkhoff.train.optim import adamw_step_kind
from birkhoff.train.weight_casts import backward_context, step_casts_of, step_context

VARIANTS = {
    "default": [],
    "plain": ["model.residual.mode=plain", "model.residual.form=paper"],  # V4's form needs mhc
    "no_engram": ["model.engram.layers=[]"],
    "v4_attention": ["model.attention.kind=v4"],
    "gqa_attention": ["model.attention.kind=gqa"],
    "dense": [],  # another recipe: DENSE_BASELINES
}
DENSE_BASELINES = {"tiny": "tiny_dense"}  # dense decoders of the model's active size
RATIOS = {  # metric: (variant, its baseline)
    "mhc_overhead": ("default", "plain"),
    "engram_overhead": ("default", "no_engram"),
    "v4_attention_cost": ("v4_attention", "gqa_attention"),
    "over_dense_per_token": ("default", "dense"),
}
SHAPES = {"tiny": (12, 128), "small": (2, 256)}  # (sequences, tokens per sequence) per step


def build(
    model: str, overrides: list[str], compiled: bool, kernels: str, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Built on the meta device and materialised on `device` as the trainer does."""
    with initialize_config_module(config_module="birkhoff.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={model}", *overrides])
    recipe, _ = load_recipe(cfg, env={})
    with torch.device("meta"):
        net = build_model(recipe.model, kernels)
    initialise(net, device, engram_host=False, seed=0)
    if compiled:
        compile_blocks(block_slots(net), "inductor")
    return net, torch.optim.AdamW(net.parameters(), lr=1e-4, **adamw_step_kind(net))  # as trained


def loader_rows(net: torch.nn.Module, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """Engram's table rows of the inputs `tokens[:, :-1]`, which the trainer's loader hashes
    on the host (data.engram_in_loader, the default) and hands over with the batch."""
    inputs = tokens[:, :-1]
    blocks = getattr(net, "blocks", {})
    return {b.layer: b.engram.hash_tokens(inputs) for b in blocks.values() if b.engram is not None}


def step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    bf16: bool,
    rows: dict[int, torch.Tensor] | None = None,
    micro_batches: int = 1,
    weight_casts: str = "per_step",
) -> None:
    """One training step on `tokens` (B, T + 1); with `rows` (loader_rows) Engram reads them
    instead of hashing the tokens in the step. `micro_batches` forwards and backwards of
    `tokens` accumulate their gradients (each loss / micro_batches, as the trainer's) before
    the one optimizer step; under bf16 the weights' casts made once for them all or by each
    (train.weight_casts; per_step is the trainer's on one device)."""
    kind = tokens.device.type
    mode = weight_casts if bf16 else "per_micro_batch"
    autocast = torch.autocast(kind, torch.bfloat16) if bf16 else contextlib.nullcontext()
    kept = step_casts_of([net]) if mode == "per_step" else []
    with step_context(mode, kept, kind, micro_batches):
        for _ in range(micro_batches):
            with autocast:
                loss = net(tokens[:, :-1], tokens[:, 1:], engram_rows=rows)
            with backward_context(mode, kind):
                (loss / micro_batches).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def measure(model: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    batch, seq = args.shape or SHAPES[model]
    step_tokens = args.micro_batches * batch * seq
    names = {  # result name: (variant, kernel backend)
        (f"{variant}/{kernels}" if len(args.kernels) > 1 else variant): (variant, kernels)
        for kernels in args.kernels
        for variant in args.variants
    }
    built = {
        name: build(
            DENSE_BASELINES[model] if v == "dense" else model,
            [*VARIANTS[v], *args.set],
            args.compile,
            kernels,
            device,
        )
        for name, (v, kernels) in names.items()
    }
    first = next(iter(built.values()))[0]
    vocab = first.cfg.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    seconds, faults = dict.fromkeys(built, 0.0), dict.fromkeys(built, 0)
    rows = {name: loader_rows(net, tokens) for name, (net, _) in built.items()}  # as trained

    def one_step(name: str, net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        step(net, optimizer, tokens, args.bf16, rows[name], args.micro_batches, args.weight_casts)

    # warm-up: the optimizer's state made, blocks compiled, and the host allocator's heap grown
    # to what a step needs (its page faults stop by the third step on a CPU)
    for name, (net, optimizer) in built.items():
        for _ in range(args.warmup):
            one_step(name, net, optimizer)
    for _ in range(args.rounds):
        for name, (net, optimizer) in built.items():
            synchronize(device)
            start, faulted = time.perf_counter(), _page_faults()
            for _ in range(args.steps):
                one_step(name, net, optimizer)
            synchronize(device)
            seconds[name] += time.perf_counter() - start
            faults[name] += _page_faults() - faulted
    per_step = {name: total / (args.rounds * args.steps) for name, total in seconds.items()}
    result = {
        "tokens_per_step": step_tokens,
        "micro_batches": args.micro_batches,
        "weight_casts": args.weight_casts if args.bf16 else None,
        "parameters": {n: count_parameters(net.cfg).as_dict() for n, (net, _) in built.items()},
        "tokens_per_s": {n: step_tokens / t for n, t in per_step.items()},
        "page_faults_per_step": {n: f / (args.rounds * args.steps) for n, f in faults.items()},
    }
    for metric, (over, base) in RATIOS.items():
        for kernels in args.kernels:
            suffix = f"/{kernels}" if len(args.kernels) > 1 else ""
            if over + suffix in per_step and base + suffix in per_step:
                key = metric + (f"_{kernels}" if suffix else "")
                result[key] = per_step[over + suffix] / per_step[base + suffix] - 1
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = device_peak(device, args.peak_tflops, dtype, Path(tempfile.gettempdir()))
    result["peak_tflops"] = {"value": peak.tflops, "source": peak.source}
    result["mfu"] = {
        n: flops_per_token(net.cfg, seq) * step_tokens / per_step[n] / (peak.tflops * 1e12)
        for n, (net, _) in built.items()
    }
    if device.type != "cpu":
        result["peak_memory_gib_all_variants"] = torch.accelerator.max_memory_allocated() / 2**30
    if args.launches:
        key = "kernel_launches_per_step" if device.type != "cpu" else "aten_calls_per_step"
        result[key] = {
            n: launches(net, optimizer, tokens, args.bf16) for n, (net, optimizer) in built.items()
        }
    if args.profile:
        default = "default" + (f"/{args.kernels[0]}" if len(args.kernels) > 1 else "")
        result["top_ops_default"] = top_ops(*built[default], tokens, args.bf16)
    return result


def _page_faults() -> int:
    """This process's page faults so far (minor: a page mapped and zeroed on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def profiled_step(
    net: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, bf16: bool
) -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if tokens.device.type != "cpu":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    rows = loader_rows(net, tokens)
    with torch.profiler.profile(activities=activities) as prof:
        step(net, optimizer, tokens, bf16, rows)
        synchronize(tokens.device)
    return prof


def launches(
    net: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, bf16: bool
) -> int:
    """Device kernels (accelerator) or aten calls (CPU) of one whole step."""
    events = profiled_step(net, optimizer, tokens, bf16).events()
    if tokens.device.type != "cpu":
        return sum(1 for e in events if e.device_type != torch.autograd.DeviceType.CPU)
    return sum(1 for e in events if e.name.startswith("aten::"))


def top_ops(
    net: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, bf16: bool
) -> list:
    """The step's 12 costliest ops: by self CPU time on a CPU, by self device time (the
    kernels) on an accelerator, each with its share and call count."""
    on_device = tokens.device.type != "cpu"
    events = profiled_step(net, optimizer, tokens, bf16).key_averages()

    def cost(e) -> float:
        return e.self_device_time_total if on_device else e.self_cpu_time_total

    total = sum(cost(e) for e in events) or 1.0
    return [
        {"op": e.key[:120], "share": round(cost(e) / total, 3), "calls": e.count}
        for e in sorted(events, key=cost, reverse=True)[:12]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="forwards and backwards of the batch per optimizer step (gradient accumulation)",
    )
    parser.add_argument(
        "--weight-casts",
        choices=("per_step", "per_micro_batch"),
        default="per_step",
        help="with --bf16: the weights' bf16 casts once per step (the trainer's on one device) "
        "or per micro-batch (train.weight_casts)",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--variants", nargs="+", default=[v for v in VARIANTS if v != "dense"], choices=VARIANTS
    )
    parser.add_argument("--compile", action="store_true", help="inductor, per block")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--kernels", nargs="+", default=["reference"], help="kernel backends")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the trainer's)")
    parser.add_argument("--shape", nargs=2, type=int, metavar=("SEQUENCES", "TOKENS"))
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides, every variant")
    parser.add_argument("--launches", action="store_true", help="kernels launched per step")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak (default: preset)")
    parser.add_argument(
        "--host-malloc", choices=HOST_MALLOC, default="reuse", help="backend.host_malloc"
    )
    args = parser.parse_args()
    malloc_line = apply_host_malloc(args.host_malloc)
    if "dense" in args.variants and set(args.models) - set(DENSE_BASELINES):
        parser.error(f"--variants dense: only {', '.join(DENSE_BASELINES)} has a dense recipe")
    if args.micro_batches < 1:
        parser.error(f"--micro-batches {args.micro_batches}: give 1 or more")
    if args.profile and "default" not in args.variants:
        parser.error("--profile profiles the default variant: include it in --variants")
    report = {
        "benchmark": "model_throughput",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "host_malloc": malloc_line,
        "compiled": args.compile,
        "device": _device_name(args.device),
        "bf16": args.bf16,
        "shape_override": args.shape,
        "set": args.set,
        "models": {m: measure(m, args) for m in args.models},
    }
    print(json.dumps(report, indent=2))


def _device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    return torch.cuda.get_device_name() if device.startswith("cuda") else device


if __name__ == "__main__":
    main()
