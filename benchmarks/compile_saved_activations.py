"""What compiled blocks keep for backward under each activation-checkpointing mode: bytes of
the tensors autograd saves in one training forward of a model whose blocks are compiled
(dynamo backend aot_eager: the same graphs and saved tensors as inductor, no C++ builds), for
parallel.activation_checkpoint none, selective and full. Under compile the checkpointed region
is part of the traced graph, so these counts include what selective checkpointing keeps (the
matmul outputs its policy saves); in eager mode its cache is invisible to autograd's hooks.
Prints one JSON object.

    python benchmarks/compile_saved_activations.py --model tiny
"""

from __future__ import annotations

import argparse
import json

import torch
from hydra import compose, initialize_config_module

from birkhoff.launch.recipe import load_recipe
from birkhoff.model import build_model
from birkhoff.parallel.activation_checkpoint import apply_activation_checkpointing
from birkhoff.parallel.compile import compile_blocks
from birkhoff.parallel.parallelize import block_slots


def saved_bytes(model: str, mode: str, tokens_shape: tuple[int, int]) -> int:
    with initialize_config_module(config_module="birkhoff.recipes", version_base=None):
        cfg = compose(config_name="config", overrides=[f"model={model}"])
    recipe, _ = load_recipe(cfg, env={})
    torch.manual_seed(0)
    net = build_model(recipe.model)
    apply_activation_checkpointing(block_slots(net), mode)
    compile_blocks(block_slots(net), "aot_eager")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, net.cfg.vocab_size, tokens_shape, generator=generator)
    net(tokens[:, :-1], tokens[:, 1:]).backward()  # compiles
    total = 0

    def count(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        loss = net(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    shape = (args.batch, args.seq_len + 1)
    saved = {mode: saved_bytes(args.model, mode, shape) for mode in ("none", "selective", "full")}
    print(json.dumps({
        "model": args.model, "tokens": args.batch * args.seq_len,
        "saved_mib": {mode: round(b / 2**20, 2) for mode, b in saved.items()},
        "selective_over_none": saved["selective"] / saved["none"],
        "full_over_none": saved["full"] / saved["none"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
