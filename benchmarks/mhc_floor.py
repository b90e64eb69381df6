"""What mHC costs a whole training step beyond its ops: the model with its mHC ops on the
reference kernels, on the cpu backend's C kernels, and replaced by stand-ins that move the least
memory an n-stream residual can (constant mappings that read no stream, the layer input as one
stream's copy, the merge as x + F(x) broadcast over the streams), against the plain residual,
round by round in one process. The stand-ins' overhead is the floor no fusing of mHC's own
ops can go below: the n x wider residual's activations and gradients, and whatever else reads
the streams (Engram's gate on each). Prints one JSON object.

    python benchmarks/mhc_floor.py --models tiny small --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from model_throughput import SHAPES, VARIANTS, build, step

from birkhoff.kernels.mhc_reference import composed_merge_read, composed_read
from birkhoff.model.mhc import HyperConnection, StreamReadout
from birkhoff.train.host_malloc import apply_host_malloc


def floor_mapping(streams, weight, alpha, bias_pre, bias_post, bias_res, *options):
    """Constant mappings of the right shapes; no stream is read."""
    shape = streams.shape[:-1]
    return (
        torch.sigmoid(bias_pre).expand(shape),
        (2 * torch.sigmoid(bias_post)).expand(shape),
        torch.softmax(bias_res, -1).expand(*shape, shape[-1]),
    )


def floor_read(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    return streams[..., 0, :].clone()


def floor_merge(streams, layer_out, h_res, h_post) -> torch.Tensor:
    return streams + layer_out.unsqueeze(-2)


def with_floor_ops(net: torch.nn.Module) -> torch.nn.Module:
    for module in net.modules():
        if isinstance(module, HyperConnection):
            module._mapping, module._pre, module._post = floor_mapping, floor_read, floor_merge
            module._read = composed_read(floor_mapping, floor_read)  # what mhc mode calls
            module._merge_read = composed_merge_read(floor_merge, module._read)
        elif isinstance(module, StreamReadout):
            module._pre = floor_read
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    args = parser.parse_args()
    result = {"benchmark": "mhc_floor", "torch": torch.__version__}
    result["host_malloc"] = apply_host_malloc("reuse")
    result["models"] = {}
    cpu = torch.device("cpu")
    for model in args.models:
        nets = {
            "reference": build(model, VARIANTS["default"], False, "reference", cpu),
            "cpu": build(model, VARIANTS["default"], False, "cpu", cpu),
            "floor": build(model, VARIANTS["default"], False, "reference", cpu),
            "plain": build(model, VARIANTS["plain"], False, "reference", cpu),
        }
        with_floor_ops(nets["floor"][0])
        batch, seq = SHAPES[model]
        tokens = torch.randint(
            0, 1000, (batch, seq + 1), generator=torch.Generator().manual_seed(0)
        )
        seconds = {name: [] for name in nets}
        for r in range(args.rounds + 1):  # the first round warms up
            for name, (net, optimizer) in nets.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(net, optimizer, tokens, False)
                if r:
                    seconds[name].append((time.perf_counter() - start) / args.steps)
        median = {name: sorted(s)[len(s) // 2] for name, s in seconds.items()}
        result["models"][model] = {
            "step_s": median,
            "overhead_over_plain": {
                name: median[name] / median["plain"] - 1 for name in ("reference", "cpu", "floor")
            },
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
