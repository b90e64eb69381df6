"""What the optimizer step costs, AdamW against Muon (optim=muon_v4), in one process.

One `tiny` model per optimizer, both fed the same gradients (one backward, copied); the
optimizer steps are timed alternately, round by round, and the fastest round counts (this
shared machine's noise only adds time). The baseline is a whole AdamW training step
(forward, backward, step) measured in the same run. Prints one JSON object.

    python benchmarks/optimizer_step.py --model tiny --rounds 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from hydra import compose, initialize_config_module

from birkhoff.launch.recipe import load_recipe
from birkhoff.model import build_model
from birkhoff.train.optim import build_optimizer


def build(model: str, optim: str):
    with initialize_config_module(config_module="birkhoff.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={model}", f"optim={optim}"])
    recipe, _ = load_recipe(cfg, env={})
    torch.manual_seed(0)
    net = build_model(recipe.model)
    optimizer, _ = build_optimizer(net, recipe.optim, 1000)
    return net, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    args = parser.parse_args()
    built = {name: build(args.model, name) for name in ("adamw_cosine", "muon_v4")}
    net = built["adamw_cosine"][0]
    tokens = torch.randint(0, net.cfg.vocab_size, (12, 129), generator=torch.Generator())
    net(tokens[:, :-1], tokens[:, 1:]).backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    best = {name: float("inf") for name in (*built, "adamw_training_step")}
    for _ in range(args.rounds):
        for name, (model, optimizer) in built.items():
            elapsed = 0.0
            for _ in range(args.steps):
                for pname, param in model.named_parameters():
                    param.grad = grads[pname].clone() if pname in grads else None
                start = time.perf_counter()
                optimizer.step()
                elapsed += time.perf_counter() - start
            best[name] = min(best[name], elapsed / args.steps)
        model, optimizer = built["adamw_cosine"]
        start = time.perf_counter()
        for _ in range(args.steps):
            model(tokens[:, :-1], tokens[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        best["adamw_training_step"] = min(
            best["adamw_training_step"], (time.perf_counter() - start) / args.steps
        )
    step = best["adamw_training_step"]
    report = {
        "benchmark": "optimizer_step",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "seconds": {name: round(t, 4) for name, t in best.items()},
        "share_of_adamw_training_step": {
            name: round(best[name] / step, 4) for name in ("adamw_cosine", "muon_v4")
        },
        "muon_over_adamw_step": round(best["muon_v4"] / best["adamw_cosine"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
