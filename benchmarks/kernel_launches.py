"""Kernel launches of one forward + backward, estimated on the CPU, per kernel backend.

A GPU runs one kernel (at least) per aten op that computes something and one per Triton
launch. Here every op that reaches a kernel (below autograd: forward and backward) is counted
through a TorchDispatchMode, leaving out views and allocations (no kernel), and every Triton
launch is counted where the interpreter runs it (the interpreter's own tensor copies are not
counted). The optimizer step is left out: it is the same for every backend; so is Engram's
hashing, which the data loader does on the host (as a training step gets it). Variants, counted
in one run on the same model and batch:
  reference           every op in plain torch
  triton              the triton backend as it is (liger-kernel's RMSNorm, SwiGLU, RoPE and
                      linear cross-entropy, our mHC, Sinkhorn, MoE permutation, Engram gate)
  triton_no_liger     the triton backend with liger's RMSNorm, SwiGLU and RoPE swapped back to
                      the reference (what it ran before they were taken)
V4 attention runs the reference in all three: FlexAttention has no backward on the CPU, and on
a GPU it is a few launches either way (the reference's blocked softmax is many: counted in
`reference` and the others alike, so the ratios here understate the GPU's).

    TRITON_INTERPRET=1 python benchmarks/kernel_launches.py --models tiny small

Prints one JSON object: launches per variant and model, the ratio reference / variant, and
the ops launching most in each.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_throughput import build, loader_rows

from birkhoff import kernels
from birkhoff.kernels.launch_counter import LaunchCounter
from birkhoff.model.v4_attention import V4Attention

LIGER_SWAPPED = {"_rms_norm": "rms_norm", "_rope": "rope", "_swiglu": "swiglu"}


def prepared(model: str, backend: str, swap_liger: bool) -> torch.nn.Module:
    net, _ = build(model, [], False, backend, torch.device("cpu"))
    reference = {attr: kernels.get(op, "reference") for attr, op in LIGER_SWAPPED.items()}
    for module in net.modules():
        if isinstance(module, V4Attention):  # see the docstring
            module._attend = kernels.get("v4_attention", "reference")
        for attr, fn in reference.items():
            if swap_liger and hasattr(module, attr):
                setattr(module, attr, fn)
    return net


def launches(net: torch.nn.Module, tokens: torch.Tensor) -> collections.Counter[str]:
    rows = loader_rows(net, tokens)  # hashed on the host by the loader: not a step's launches
    counter = LaunchCounter()
    with counter, counter.triton():
        net(tokens[:, :-1], tokens[:, 1:], engram_rows=rows).backward()
    return counter.by_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--shape", nargs=2, type=int, default=[2, 64], metavar=("SEQS", "TOKENS"))
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1: the triton variants run under Triton's interpreter")
    variants = {"reference": ("reference", False), "triton": ("triton", False)}
    variants["triton_no_liger"] = ("triton", True)
    result: dict = {"shape": args.shape, "models": {}}
    for model in args.models:
        row: dict = {"launches": {}, "reference_over": {}, "top": {}}
        for name, (backend, swap) in variants.items():
            net = prepared(model, backend, swap)
            vocab = net.cfg.vocab_size
            tokens = torch.randint(0, vocab, (args.shape[0], args.shape[1] + 1),
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
            start = time.perf_counter()
            counts = launches(net, tokens)
            print(f"{model} {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
            row["launches"][name] = sum(counts.values())
            row["top"][name] = dict(counts.most_common(8))
        for name, total in row["launches"].items():
            if name != "reference":
                row["reference_over"][name] = round(row["launches"]["reference"] / total, 2)
        result["models"][model] = row
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
