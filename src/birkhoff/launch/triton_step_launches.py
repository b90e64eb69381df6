"""The Triton launches of one training step of a recipe model on the `triton` backend: its
forward and backward under bf16 autocast with float32 parameters, as
`train.mixed_precision=bf16` trains, and with bf16 ones (and so bf16 residual streams), as
FSDP's `parallel.param_dtype=bfloat16` computes, run here by Triton's interpreter. Each
distinct launch (kernel, argument types, constexpr values) is printed as JSON for
`launch/triton_build.py` to compile: the doctor's examples, which it also compiles, are
float32, while a training step hands most kernels bf16 tensors, and a variant the compiler
was never given can fail on the GPU where the interpreter ran it. CPU autocast's op lists
are not CUDA's, so the dtypes at some kernel boundaries may differ from a GPU step's: an
approximation of it, beside the examples.

    TRITON_INTERPRET=1 python -m birkhoff.launch.triton_step_launches --model tiny

V4 attention runs the reference here (FlexAttention has no backward on a CPU; on a GPU
inductor compiles it, no kernel of ours).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import Any

import torch

from birkhoff.launch.triton_build import launch_signature


def encode(value: Any) -> Any:
    """A constexpr value as JSON: numbers, booleans, None and strings as they are, Triton's
    dtypes by name."""
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"triton_dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"triton_step_launches: no JSON form for a constexpr {value!r}")


def _is_constexpr(annotation: Any) -> bool:
    import triton.language as tl

    return annotation is tl.constexpr or str(annotation) in ("tl.constexpr", "constexpr")


def recorded(model: str, sequences: int, tokens: int) -> list[dict]:
    """Every distinct launch of one bf16 step of `model` on the triton backend."""
    from triton.runtime.interpreter import InterpretedFunction

    from birkhoff import kernels
    from birkhoff.launch.recipe import compose_recipe, load_recipe
    from birkhoff.model import build_model
    from birkhoff.model.v4_attention import V4Attention

    recipe, _ = load_recipe(compose_recipe([f"model={model}"]), {})
    net = build_model(recipe.model, "triton", seed=0)
    for module in net.modules():
        if isinstance(module, V4Attention):  # see the docstring
            module._attend = kernels.get("v4_attention", "reference")
    launches: dict[str, dict] = {}
    original = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):  # JITFunction.run's signature
        declared = inspect.signature(self.fn).parameters.items()
        params = [(name, p.default, _is_constexpr(p.annotation)) for name, p in declared]
        signature, constexprs = launch_signature(params, self.arg_names, args, kwargs)
        launch = {"module": self.fn.__module__, "kernel": self.fn.__qualname__}
        launch["signature"] = signature
        launch["constexprs"] = {name: encode(value) for name, value in constexprs.items()}
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    batch = torch.randint(0, recipe.model.vocab_size, (sequences, tokens + 1))
    InterpretedFunction.run = record
    try:
        # float32 parameters (and residual streams), then bf16 ones: FSDP's param_dtype casts
        # the parameters, not the buffers (router bias, RoPE tables stay float32)
        for dtype in (torch.float32, torch.bfloat16):
            for param in net.parameters():
                param.data = param.data.to(dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = net(batch[:, :-1], batch[:, 1:])
            loss.backward()
    finally:
        InterpretedFunction.run = original
    return list(launches.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=inspect.cleandoc(__doc__).splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--shape", type=int, nargs=2, default=[1, 16], metavar=("SEQS", "TOKENS"))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("triton_step_launches: set TRITON_INTERPRET=1 (the step runs interpreted)")
        return 2
    print(json.dumps(recorded(args.model, *args.shape)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
