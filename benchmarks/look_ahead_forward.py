"""Anticipatory Routing's look-ahead forward: the no-grad forward in eval mode that records
the experts, as it runs (`routes_only`: every MoE layer, the MTP depths' included, and no
head) against the whole eval forward with the loss it ran before (the same batch, the same
model, alternating round by round), and a training step (forward, backward, AdamW) for
scale. Prints one JSON object.

    python benchmarks/look_ahead_forward.py --models tiny small --rounds 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from model_throughput import SHAPES, VARIANTS, build, step


def seconds(fn, rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - start) / rounds


def measure(model: str, rounds: int) -> dict[str, float]:
    net, optimizer = build(model, VARIANTS["default"], False, "reference", torch.device("cpu"))
    batch, seq = SHAPES[model]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, net.cfg.vocab_size, (batch, seq + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    @torch.no_grad()
    def look_ahead(routes_only: bool) -> None:
        net.eval()
        net(inputs, targets, routes_only=routes_only)
        net.train()

    times = {"routes_only": 0.0, "with_loss": 0.0}
    look_ahead(True), look_ahead(False), step(net, optimizer, tokens, False)  # warm-up
    for _ in range(rounds):  # interleaved: machine noise hits both alike
        times["routes_only"] += seconds(lambda: look_ahead(True), 1)
        times["with_loss"] += seconds(lambda: look_ahead(False), 1)
    per = {name: total / rounds for name, total in times.items()}
    train_step = seconds(lambda: step(net, optimizer, tokens, False), max(1, rounds // 2))
    return {
        "look_ahead_s": per,
        "ratio": per["routes_only"] / per["with_loss"],
        "training_step_s": train_step,
        "look_ahead_share_of_step": {k: v / train_step for k, v in per.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = {"benchmark": "look_ahead_forward", "torch": torch.__version__}
    result["models"] = {model: measure(model, args.rounds) for model in args.models}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
