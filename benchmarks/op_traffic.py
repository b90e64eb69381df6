"""Device-memory bytes each registry op moves in a forward + backward, per backend against the
reference, counted on the CPU: a fused kernel's gain where it is memory-bound, which the
interpreter cannot time.

Each op runs on `birkhoff doctor`'s example inputs (launch/doctor_examples.py) at the
doctor's interpreted token count, its gradients from ones; bytes are counted as the plan's
activation factor counts them (kernels/moved_bytes.py: aten ops but the matmuls, every
interpreted Triton launch's distinct addresses). An op whose backend computes through
torch.compile (FlexAttention) hides its kernels from the count and is left out with the reason.

    TRITON_INTERPRET=1 python benchmarks/op_traffic.py [--backend triton] [--tokens 16]

Prints one JSON object: per op the reference's and the backend's bytes (forward, and forward
with backward) and reference / backend.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

from birkhoff import kernels
from birkhoff.kernels.moved_bytes import MovedBytes
from birkhoff.launch.doctor_examples import CONSTANT_ARGS, EXAMPLES, NO_BACKWARD, NO_CPU_BACKWARD
from birkhoff.launch.doctor_kernels import as_tuple, cast_floating, leaf_copies

COMPILED = {"v4_attention": "FlexAttention runs compiled: its kernels are not counted"}


def moved(
    op, inputs: list, backward: bool, constants: tuple[int, ...], triton: bool
) -> tuple[int, int]:
    """Bytes of `op`'s forward, and of its forward and backward together (`triton`: its
    interpreted launches counted too)."""
    args, _ = leaf_copies(inputs, None, backward, constants)
    counter = MovedBytes()
    with counter, counter.triton() if triton else contextlib.nullcontext():
        outs = [out for out in as_tuple(op(*args)) if out.requires_grad or not backward]
        forward = counter.total
        if backward:
            torch.autograd.backward(outs, [torch.ones_like(out) for out in outs])
    return forward, counter.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton", choices=["triton", "cpu"])
    parser.add_argument("--tokens", type=int, default=16, help="the doctor's interpreted count")
    args = parser.parse_args()
    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1: the triton backend runs under Triton's interpreter")
    table = kernels.implementations(args.backend)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                    "backend": args.backend, "tokens": args.tokens, "ops": {},
                    "left_out": {}}  # fmt: skip
    for op in sorted(op for op, impl in table.items() if impl == args.backend):
        if op in COMPILED:
            result["left_out"][op] = COMPILED[op]
            continue
        torch.manual_seed(0)
        inputs = EXAMPLES[op](args.tokens)
        limited = kernels.dtypes_of(op, args.backend)
        if limited:
            inputs = [cast_floating(a, limited[0]) for a in inputs]
        backward = op not in NO_BACKWARD and op not in NO_CPU_BACKWARD
        constants = CONSTANT_ARGS.get(op, ())
        row = {}
        for backend in ("reference", args.backend):
            fn = kernels.get(op, backend)
            forward, both = moved(fn, inputs, backward, constants, args.backend == "triton")
            row[backend] = {"forward": forward, "with_backward": both}
        total = "with_backward" if backward else "forward"
        row["reference_over_backend"] = round(
            row["reference"][total] / max(row[args.backend][total], 1), 2
        )
        result["ops"][op] = row
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
