"""Training tokens/s of birkhoff's DeepSeek-V4 model against transformers' DeepseekV4ForCausalLM,
the same weights on the same batch, measured in one run (interleaved, ratios not absolute times).

The model is the `tiny` recipe made V4 and holdable by transformers (V4 attention: sliding, CSA,
HCA layers; mHC; MoE in every layer, the first hash-routed; no Engram). transformers' model gets
the weights through checkpoint/hf_deepseek_v4.py (to_hf_state_dict). Both run fp32 on the CPU.
Before timing, both losses on the batch are checked equal. A step is forward with loss, backward,
AdamW, zero_grad; the two models alternate round by round. Prints one JSON object.

    python benchmarks/v4_vs_transformers.py --rounds 5 --steps 2 --threads 1 --profile 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from hydra import compose, initialize_config_module

from birkhoff.checkpoint.hf_deepseek_v4 import (
    hf_config_kwargs,
    hf_incompatibilities,
    to_hf_state_dict,
)
from birkhoff.launch.recipe import load_recipe
from birkhoff.model import build_model
from birkhoff.model.budget import count_parameters
from birkhoff.model.transformer import Transformer

HF_COMPATIBLE = [  # tiny, as transformers' DeepseekV4 can hold it
    "model=tiny",
    "model.attention.kind=v4",  # layer types: sliding, sliding, csa, hca
    "model.engram.layers=[]",
    "model.moe.first_k_dense=0",
    "model.moe.hash_layers=1",
    "model.moe.score_func=sqrt_softplus",
    "model.moe.swiglu_limit=10",
]
Tensor = torch.Tensor
Step = Callable[[], Tensor]


def build(seq: int) -> tuple[Transformer, torch.nn.Module]:
    """birkhoff's model and transformers' with the same weights (loaded strictly)."""
    with initialize_config_module(config_module="birkhoff.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=[*HF_COMPATIBLE, f"model.max_seq_len={seq}"])
    recipe, _ = load_recipe(cfg, env={})
    assert not hf_incompatibilities(recipe.model), hf_incompatibilities(recipe.model)
    torch.manual_seed(0)
    ours = build_model(recipe.model)
    config = transformers.DeepseekV4Config(**hf_config_kwargs(ours.cfg), use_cache=False)
    theirs = transformers.DeepseekV4ForCausalLM(config).float()  # default attention: eager
    theirs.load_state_dict(to_hf_state_dict(ours), strict=True)
    return ours.train(), theirs.train()


def ours_loss(net: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[Tensor, ...]:
    """Transformer.forward(inputs, targets) split into its cross-entropy and the auxiliary losses
    it adds (the CSA indexer's KL; the MoE balance loss is 0 with seq_aux_loss_coef=0), and the
    logits."""
    ctx = net.context(inputs.shape[1], None, None)
    x, aux = net.run_blocks(net.embed(inputs), inputs, ctx)
    return net.output_loss(x, targets, ctx, None), sum(aux), net.logits(x)


def theirs_loss(net: torch.nn.Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    # Mean next-token cross-entropy from its logits, as birkhoff computes it (fp32 logits, the
    # targets are the inputs shifted by one); not labels=, which would shift inside the batch.
    logits = net(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()), logits


def trainer(net: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Step:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> torch.Tensor:
        value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    return step


def top_ops(step: Step, count: int) -> dict:
    """The ops of one profiled step with the most self CPU time."""
    with torch.profiler.profile() as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:count]
    ops = [
        {"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
        for e in ranked
    ]
    return {"profiled_step_ms": round(total / 1000, 1), "ops": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--profile", type=int, default=0, help="top ops of one step of each")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, theirs = build(args.seq)
    vocab = ours.cfg.vocab_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():  # the same computation: equal losses before any step
        ce_ours, aux_ours, logits = ours_loss(ours, inputs, targets)
        ce_theirs, their_logits = theirs_loss(theirs, inputs, targets)
    ce_ours, aux_ours, ce_theirs = ce_ours.item(), aux_ours.item(), ce_theirs.item()
    relative = abs(ce_ours - ce_theirs) / abs(ce_theirs)
    if relative > 1e-4:
        raise SystemExit(f"losses differ: birkhoff {ce_ours}, transformers {ce_theirs}")
    steps = {
        "birkhoff": trainer(ours, lambda: ours(inputs, targets)),  # CE + indexer KL, as trained
        "transformers": trainer(theirs, lambda: theirs_loss(theirs, inputs, targets)[0]),
    }
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    tokens_per_step = args.batch * args.seq
    # Wall-clock tokens/s, and tokens per CPU second of this process: on a shared machine the
    # latter does not count the time other processes hold the cores (exact with --threads 1).
    per_round: dict[str, list[float]] = {name: [] for name in steps}
    per_cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step()
            per_round[name].append(tokens_per_step * args.steps / (time.perf_counter() - start))
            per_cpu[name].append(tokens_per_step * args.steps / (time.process_time() - cpu))
    cfg = ours.cfg
    shape = {"batch": args.batch, "seq": args.seq, "hidden": cfg.hidden_size, "vocab": vocab}
    shape |= {"layers": cfg.attention.layer_types, "experts": cfg.moe.num_experts}
    loss_check = {"birkhoff_ce": ce_ours, "transformers_ce": ce_theirs, "relative_diff": relative}
    loss_check["max_abs_logit_diff"] = (logits - their_logits).abs().max().item()
    loss_check["birkhoff_indexer_loss"] = aux_ours  # added to its training loss, not to theirs
    ratios = [a / b for a, b in zip(per_round["birkhoff"], per_round["transformers"], strict=True)]
    cpu_ratios = [a / b for a, b in zip(per_cpu["birkhoff"], per_cpu["transformers"], strict=True)]
    report = {
        "benchmark": "v4_vs_transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "shape": shape,
        "parameters": count_parameters(ours.cfg).as_dict(),
        "transformers_attention": theirs.config._attn_implementation,
        "transformers_experts": theirs.config._experts_implementation,
        "transformers_loss": "cross_entropy of its logits, as birkhoff's (not labels=)",
        "loss_check": loss_check,
        "tokens_per_step": tokens_per_step,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "tokens_per_s": {name: [round(v, 1) for v in values] for name, values in per_round.items()},
        "median_tokens_per_s": {n: round(statistics.median(v), 1) for n, v in per_round.items()},
        "ratio_per_round": [round(r, 3) for r in ratios],
        "ratio_birkhoff_over_transformers": round(statistics.median(ratios), 3),
        "tokens_per_cpu_s": {n: [round(v, 1) for v in values] for n, values in per_cpu.items()},
        "cpu_ratio_per_round": [round(r, 3) for r in cpu_ratios],
        "cpu_ratio_birkhoff_over_transformers": round(statistics.median(cpu_ratios), 3),
    }
    if args.profile:
        report["top_ops"] = {name: top_ops(step, args.profile) for name, step in steps.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
