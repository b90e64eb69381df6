"""Training throughput of the model variants, measured in one run (ratios, not absolute times).

For each model recipe it times forward + backward + AdamW on synthetic tokens for:
  default (mHC + MoE + Engram as in the recipe), plain (residual.mode=plain), no_engram
(engram.layers=[]), v4_attention and gqa_attention (attention.kind); variants are interleaved
round by round so machine noise hits all alike. Prints one JSON object: tokens/s per variant,
mHC overhead = time(mHC)/time(plain) - 1, Engram overhead = time(Engram)/time(no Engram) - 1,
V4 attention cost = time(V4 attention)/time(GQA) - 1, and with --profile the top ops of the
default. `--compile` compiles every variant's blocks with inductor (train.compile's per-block
compilation) and warms them up before timing; `--variants` picks some.

    python benchmarks/model_throughput.py --models tiny small --rounds 3
    python benchmarks/model_throughput.py --models small --variants default plain --compile
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from hydra import compose, initialize_config_module

from birkhoff.launch.recipe import load_recipe
from birkhoff.model import build_model
from birkhoff.model.budget import count_parameters
from birkhoff.parallel.compile import compile_blocks
from birkhoff.parallel.parallelize import block_slots

VARIANTS = {
    "default": [],
    "plain": ["model.residual.mode=plain", "model.residual.form=paper"],  # V4's form needs mhc
    "no_engram": ["model.engram.layers=[]"],
    "v4_attention": ["model.attention.kind=v4"],
    "gqa_attention": ["model.attention.kind=gqa"],
}
RATIOS = {  # metric: (variant, its baseline)
    "mhc_overhead": ("default", "plain"),
    "engram_overhead": ("default", "no_engram"),
    "v4_attention_cost": ("v4_attention", "gqa_attention"),
}
SHAPES = {"tiny": (12, 128), "small": (2, 256)}  # (sequences, tokens per sequence) per step


def build(
    model: str, overrides: list[str], compiled: bool
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    with initialize_config_module(config_module="birkhoff.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={model}", *overrides])
    recipe, _ = load_recipe(cfg, env={})
    torch.manual_seed(0)
    net = build_model(recipe.model)
    if compiled:
        compile_blocks(block_slots(net), "inductor")
    return net, torch.optim.AdamW(net.parameters(), lr=1e-4)


def step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    net(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(
    model: str, rounds: int, steps: int, profile: bool, variants: list[str], compiled: bool
) -> dict:
    batch, seq = SHAPES[model]
    built = {name: build(model, VARIANTS[name], compiled) for name in variants}
    vocab = next(iter(built.values()))[0].cfg.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    seconds = dict.fromkeys(built, 0.0)
    for net, optimizer in built.values():  # warm-up (compiled: the compiles, then one more)
        for _ in range(2 if compiled else 1):
            step(net, optimizer, tokens)
    for _ in range(rounds):
        for name, (net, optimizer) in built.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(net, optimizer, tokens)
            seconds[name] += time.perf_counter() - start
    per_step = {name: total / (rounds * steps) for name, total in seconds.items()}
    result = {
        "tokens_per_step": batch * seq,
        "parameters": {n: count_parameters(net.cfg).as_dict() for n, (net, _) in built.items()},
        "tokens_per_s": {n: batch * seq / t for n, t in per_step.items()},
    }
    for metric, (over, base) in RATIOS.items():
        if over in per_step and base in per_step:
            result[metric] = per_step[over] / per_step[base] - 1
    if profile:
        result["top_ops_default"] = top_ops(*built["default"], tokens)
    return result


def top_ops(net: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> list:
    with torch.profiler.profile() as prof:
        step(net, optimizer, tokens)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [
        {"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
        for e in events
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--compile", action="store_true", help="inductor, per block")
    args = parser.parse_args()
    if args.profile and "default" not in args.variants:
        parser.error("--profile profiles the default variant: include it in --variants")
    report = {
        "benchmark": "model_throughput",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "compiled": args.compile,
        "models": {
            m: measure(m, args.rounds, args.steps, args.profile, args.variants, args.compile)
            for m in args.models
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
