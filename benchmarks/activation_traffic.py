"""Device-memory bytes a forward + backward's elementwise kernels move per byte autograd saves,
per kernel backend: the factor `birkhoff plan` times its activation terms by
(parallel/planning/traffic.py, ACTIVATION_TRAFFIC).

Counted on the CPU (kernels/moved_bytes.py): every aten op outside the matmuls, its tensor
arguments read and its new outputs and mutated arguments written; every Triton launch, run by
Triton's interpreter, the distinct addresses its loads read and its stores and atomics write.
Per token: two batch sizes apart, so that what scales with the parameters (weight gradients,
casts) drops out. The saved bytes are the plan's activation terms for the same shape, in
float32 as the model runs here. V4 attention's core runs the reference in every variant
(FlexAttention has no backward on the CPU; the plan's launch count and its attention terms
take the reference's too). Shapes: `small` (GQA attention) and a 16B-class shape's widths (as
tests/test_plan_traffic.py counts the reference's), 64 tokens a sequence.

    TRITON_INTERPRET=1 python benchmarks/activation_traffic.py

Prints one JSON object: per shape and backend the factor and the ops moving most (as shares
of the saved bytes), and triton's factor over the reference's. The interpreter runs every
Triton program in Python: about 15 minutes a shape on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time

import torch

from birkhoff.launch.recipe import compose_recipe, typed_recipe
from birkhoff.model import build_model
from birkhoff.model.budget import apply_sparse_budget
from birkhoff.parallel.planning.activations import block_terms, bytes_per_token, head_terms

SHAPES = {
    "small": ["model=small", "data.seq_len=64"],
    "16b_class_widths": [
        "model=small", "model.hidden_size=1024", "model.num_layers=2", "model.num_heads=8",
        "model.num_kv_heads=4", "model.moe.num_experts=8", "model.moe.top_k=6",
        "model.moe.expert_ffn_hidden_size=704", "model.engram.layers=[1]", "data.seq_len=64",
    ],
}  # fmt: skip
# the same with a plain residual (x + F(x)), where the triton kernels have no mHC to fuse
SHAPES["16b_class_widths_plain"] = [
    *SHAPES["16b_class_widths"],
    "model.residual.mode=plain",
    "model.residual.form=paper",
]
BATCHES = (1, 3)


def saved_per_token(cfg, seq: int) -> float:
    """The plan's activation terms per token, float32, every tensor kept."""
    sized = apply_sparse_budget(cfg)
    layers = range(sized.num_layers + sized.mtp.depth)
    saved = sum(bytes_per_token(block_terms(sized, i, seq, 4), 1, False, "all") for i in layers)
    return saved + bytes_per_token(head_terms(sized, 4), 1, False, "all")


def counted(cfg, seq: int, backend: str) -> tuple[float, dict[str, float]]:
    """Bytes per token of a forward and backward on `backend`, and per op."""
    from birkhoff import kernels
    from birkhoff.kernels.moved_bytes import MovedBytes
    from birkhoff.model.v4_attention import V4Attention

    model = build_model(cfg, backend, seed=0)
    for module in model.modules():
        if isinstance(module, V4Attention):  # see the docstring
            module._attend = kernels.get("v4_attention", "reference")
    totals, names = [], []
    for batch in BATCHES:
        generator = torch.Generator().manual_seed(batch)
        tokens = torch.randint(0, model.cfg.vocab_size, (batch, seq), generator=generator)
        model.zero_grad(set_to_none=True)
        moved = MovedBytes()
        with moved, moved.triton():
            model(tokens, tokens.roll(-1, dims=1)).backward()
        totals.append(moved.total)
        names.append(moved.by_name)
    tokens = (BATCHES[1] - BATCHES[0]) * seq
    per_op = {k: (names[1][k] - names[0][k]) / tokens for k in names[1]}
    return (totals[1] - totals[0]) / tokens, per_op


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--backends", nargs="+", default=["reference", "triton"])
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    if "triton" in args.backends and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1: the triton backend runs under Triton's interpreter")
    result: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                    "triton": _version("triton"), "batches": BATCHES, "shapes": {}}  # fmt: skip
    for shape in args.shapes:
        recipe = typed_recipe(compose_recipe(SHAPES[shape]))
        seq = recipe.data.seq_len
        saved = saved_per_token(recipe.model, seq)
        row: dict = {"saved_bytes_per_token": saved, "factor": {}, "top": {}}
        for backend in args.backends:
            start = time.perf_counter()
            per_token, per_op = counted(recipe.model, seq, backend)
            print(f"{shape} {backend}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
            row["factor"][backend] = round(per_token / saved, 3)
            top = sorted(per_op.items(), key=lambda item: -item[1])[: args.top]
            row["top"][backend] = {name: round(moved / saved, 3) for name, moved in top}
        if {"reference", "triton"} <= set(row["factor"]):
            row["triton_over_reference"] = round(
                row["factor"]["triton"] / row["factor"]["reference"], 3
            )
        result["shapes"][shape] = row
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
