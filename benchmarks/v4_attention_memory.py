"""Peak memory and time of one attention layer's forward + backward against sequence length:
DeepSeek-V4 attention (sliding window, CSA with its indexer, HCA) against GQA, same width.

Each (layer, T) runs in a fresh process; peak memory is the growth of the process's resident
high-water mark over the forward and backward (inputs and weights allocated before). Prints one
JSON object; the GQA rows are the baseline measured in the same run.

    python benchmarks/v4_attention_memory.py --lengths 2048 8192 32768
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

HIDDEN, HEADS = 64, 4


def run_one(kind: str, seq: int) -> dict:
    from birkhoff.model.attention import Attention
    from birkhoff.model.config import AttentionConfig, ModelConfig
    from birkhoff.model.context import SequenceContext
    from birkhoff.model.rope import rope_tables
    from birkhoff.model.v4_attention import V4Attention

    torch.manual_seed(0)
    cfg = AttentionConfig(
        kind="v4",
        head_dim=32,
        rope_head_dim=8,
        q_lora_rank=48,
        o_groups=2,
        o_lora_rank=24,
        sliding_window=128,
        csa_ratio=4,
        hca_ratio=128,
        index_heads=2,
        index_head_dim=16,
        index_topk=64,
    )
    if kind == "gqa":
        model_cfg = ModelConfig(hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=2)
        layer = Attention(model_cfg)
        cos, sin = rope_tables(model_cfg.head_dim, seq, 10000.0)
        ctx = SequenceContext(cos, sin)
    else:
        layer = V4Attention(HIDDEN, HEADS, cfg, kind, 1e-6, 10000.0)
        ctx = SequenceContext()
    x = torch.randn(1, seq, HIDDEN, requires_grad=True)
    aux: list[torch.Tensor] = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = layer(x, ctx) if kind == "gqa" else layer(x, ctx, aux)
    (out.square().mean() + sum(aux)).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"layer": kind, "seq": seq, "peak_mib": (peak - before) / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--layers", nargs="+", default=["gqa", "sliding", "csa", "hca"])
    parser.add_argument("--one", nargs=2, metavar=("LAYER", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return
    rows = []
    for seq in args.lengths:
        for kind in args.layers:
            command = [sys.executable, __file__, "--one", kind, str(seq)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(json.dumps({"benchmark": "v4_attention_memory", "torch": torch.__version__,
                      "hidden": HIDDEN, "heads": HEADS, "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
