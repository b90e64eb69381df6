"""The head's loss in chunks (the linear_cross_entropy op) against the whole logits.

One forward and backward of hidden (tokens, C) @ weight.T -> cross-entropy, as the model ran it
before (`F.cross_entropy` of the float32 logits) and through the registry's op (`reference`:
chunks of tokens whose float32 logits fit 256 MiB; with --backend triton, liger-kernel's), in
float32 and under bf16 autocast. Both are timed round by round in one run (the fastest round
counts) and their allocator peaks measured; prints one JSON object with the ratios.

    python benchmarks/linear_cross_entropy.py --tokens 4096 --hidden 512 --vocab 129280
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from birkhoff import kernels
from birkhoff.parallel.memory import AllocatedPeak


def whole_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def run(loss_of, hidden, weight, targets, device, bf16: bool) -> tuple[float, int]:
    """Seconds and allocator peak (bytes above the start) of one forward and backward."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
    with AllocatedPeak(device) as allocated:
        start = time.perf_counter()
        with autocast:
            loss = loss_of(h, w, targets)
        loss.backward()
        if device.type != "cpu":
            torch.accelerator.synchronize()
        seconds = time.perf_counter() - start
    return seconds, allocated.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=129280)  # V4's
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="reference", choices=kernels.BACKENDS)
    args = parser.parse_args()
    device = torch.accelerator.current_accelerator() or torch.device("cpu")
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, device=device)
    weight = torch.randn(args.vocab, args.hidden, device=device) / args.hidden**0.5
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    chunked = kernels.get("linear_cross_entropy", args.backend)
    result = {"device": str(device), "backend": args.backend} | vars(args)
    for bf16 in (False, True):
        best = {"whole": (float("inf"), 0), "chunked": (float("inf"), 0)}
        for _ in range(args.rounds):  # alternating, so noise hits both alike
            for name, loss_of in (("whole", whole_logits), ("chunked", chunked)):
                seconds, peak = run(loss_of, hidden, weight, targets, device, bf16)
                best[name] = (min(best[name][0], seconds), max(best[name][1], peak))
        (t_whole, m_whole), (t_chunked, m_chunked) = best["whole"], best["chunked"]
        result["bf16" if bf16 else "float32"] = {
            "whole_logits_s": t_whole,
            "chunked_s": t_chunked,
            "time_ratio_chunked_over_whole": t_chunked / t_whole,
            "whole_logits_peak_mib": m_whole / 2**20,
            "chunked_peak_mib": m_chunked / 2**20,
            "memory_ratio_whole_over_chunked": m_whole / m_chunked,
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
