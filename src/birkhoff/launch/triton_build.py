"""Compile every Triton kernel the `triton` backend launches, for a GPU that is not here.

Triton's interpreter (TRITON_INTERPRET=1, how the kernel tests run on a CPU) executes a
kernel's Python but enforces none of the compiler's rules: a module-level float read inside
a kernel runs interpreted and fails to compile on a GPU. Triton's compiler itself needs no
GPU (AST -> TTIR -> TTGIR -> LLVM -> PTX -> cubin, ptxas ships in the triton wheel), so this
runs each triton op of the backend forward and backward on the doctor's example inputs (at
512 tokens, where V4 attention's further call gathers CSA's picks; its gathered kernels also
forward and backward at V4's width: the examples' FlexAttention has no backward on a CPU)
with the launches recorded instead of run, adds the launches of one bf16 training step of a
recipe model (launch/triton_step_launches.py: the bf16 variants a step hands the kernels), then
compiles each distinct launch (kernel, argument types, constexpr values) for the requested
architectures. It must run without
TRITON_INTERPRET (then `@triton.jit` makes interpreted functions instead of compilable ones).

    python -m birkhoff.launch.triton_build --arch 90 80     # exit code 1 on any failure
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
from typing import Any

import torch

TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "i1",
}  # fmt: skip


# Tokens of the examples whose launches are recorded (not run: only the torch around them
# computes): the doctor's CPU count, at which V4 attention's further call gathers CSA's picks
# (too few entries at 16 tokens) and so launches the gathered kernel.
RECORD_TOKENS = 512


def argument_type(value: Any) -> str:
    """The type Triton's signature gives a launch argument."""
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


def launch_signature(
    params: list[tuple[str, Any, bool]], arg_names: list[str], args: tuple, kwargs: dict
) -> tuple[dict, dict]:
    """A launch's Triton signature and constexpr values, from its kernel's parameters (name,
    default, declared constexpr) and the launch's arguments; a None argument is a constexpr,
    as Triton makes it."""
    bound = dict(zip(arg_names, args, strict=False)) | kwargs
    signature, constexprs = {}, {}
    for name, default, constexpr in params:
        value = bound.get(name, default)
        if constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = argument_type(value)
    return signature, constexprs


def launch_key(kernel: str, module: str, signature: dict, constexprs: dict) -> tuple:
    """One launch's identity: the kernel, its argument types and constexpr values (the
    examples' and a training step's launches are merged by it)."""
    return (kernel, module, tuple(signature.items()), tuple(sorted(constexprs.items())))


def recorded_launches(ops: list[str]) -> dict[tuple, tuple]:
    """Run `ops` of the triton backend forward and backward on the doctor's examples with
    every kernel launch recorded, not run: {(kernel, signature, constexprs): (fn, signature,
    constexprs, the ops that launch it)}."""
    from triton.runtime.jit import JITFunction

    from birkhoff import kernels
    from birkhoff.launch.doctor_kernels import (
        CONSTANT_ARGS,
        EXAMPLES,
        NO_BACKWARD,
        NO_CPU_BACKWARD,
        as_tuple,
        cast_floating,
        example_calls,
        leaf_copies,
    )

    launches: dict[tuple, tuple] = {}
    current: list[str] = []

    def record(self, *args, grid, warmup, **kwargs):  # JITFunction.run's signature
        params = [(p.name, p.default, p.is_constexpr) for p in self.params]
        signature, constexprs = launch_signature(params, self.arg_names, args, kwargs)
        key = launch_key(self.fn.__qualname__, self.fn.__module__, signature, constexprs)
        launches.setdefault(key, (self, signature, constexprs, set()))[3].add(current[0])

    original, JITFunction.run = JITFunction.run, record
    try:
        for op in ops:
            current[:] = [op]
            torch.manual_seed(0)
            inputs = EXAMPLES[op](RECORD_TOKENS)
            limited = kernels.dtypes_of(op, "triton")
            if limited:
                inputs = [cast_floating(a, limited[0]) for a in inputs]
            # FlexAttention: compiled by inductor instead; entry_mass has no backward
            backward = op not in NO_CPU_BACKWARD and op not in NO_BACKWARD
            for call in example_calls(op, inputs):
                args, leaves = leaf_copies(call, None, backward, CONSTANT_ARGS.get(op, ()))
                outs = [o for o in as_tuple(kernels.get(op, "triton")(*args)) if o.requires_grad]
                if backward:
                    grads = [torch.ones_like(o) for o in outs]
                    torch.autograd.grad(outs, leaves, grads, allow_unused=True)
        if "v4_attention" in ops:  # its backward does not run on a CPU (FlexAttention's)
            current[:] = ["v4_attention"]
            _gathered_attention_both_ways()
    finally:
        JITFunction.run = original
    return launches


def _gathered_attention_both_ways() -> None:
    """CSA's gathered-picks kernels (kernels/triton_gathered_attention.py) forward and
    backward, in float32 and bfloat16 (the doctor's two dtypes of V4 attention), at V4's
    heads of 512 channels (the channels are one block: the widest tiles)."""
    from birkhoff.kernels.triton_gathered_attention import gathered_entry_attention

    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 8, 64, 512, dtype=dtype, requires_grad=True)
        values = torch.randn(1, 32, 512, dtype=dtype, requires_grad=True)
        picks = torch.randint(0, 32, (1, 8, 16))
        out, lse = gathered_entry_attention(
            q, values, picks, torch.ones(1, 8, 16, dtype=torch.bool)
        )
        torch.autograd.grad((out, lse), (q, values), (torch.ones_like(out), torch.ones_like(lse)))


def step_launches(model: str) -> dict[tuple, tuple]:
    """The launches of one bf16 training step of `model` (launch/triton_step_launches.py, run
    interpreted in a child process), in `recorded_launches`' form."""
    import importlib

    import triton.language as tl

    command = [sys.executable, "-m", "birkhoff.launch.triton_step_launches", "--model", model]
    env = os.environ | {"TRITON_INTERPRET": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode:
        raise RuntimeError(f"triton_step_launches failed:\n{done.stderr[-3000:]}")
    launches: dict[tuple, tuple] = {}
    for launch in json.loads(done.stdout):
        fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        constexprs = {
            name: tl.dtype(value["triton_dtype"]) if isinstance(value, dict) else value
            for name, value in launch["constexprs"].items()
        }
        signature = launch["signature"]
        key = launch_key(launch["kernel"], launch["module"], signature, constexprs)
        launches[key] = (fn, signature, constexprs, {f"{model} bf16 step"})
    return launches


def build(archs: list[int], step_model: str | None = "tiny") -> dict:
    """Compile every launch of every op the triton backend implements itself, on the doctor's
    examples and in one bf16 training step of `step_model` (None: the examples only)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from birkhoff import kernels

    ops = [op for op, impl in kernels.implementations("triton").items() if impl == "triton"]
    launches = recorded_launches(ops)
    if step_model is not None:
        for key, (fn, signature, constexprs, by) in step_launches(step_model).items():
            launches.setdefault(key, (fn, signature, constexprs, set()))[3].update(by)
    results = []
    for (name, module, _, _), (fn, signature, constexprs, by) in launches.items():
        entry = {"ops": sorted(by), "kernel": f"{module}.{name}", "signature": signature}
        entry["constexprs"] = {k: repr(v) for k, v in constexprs.items()}
        for arch in archs:
            source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            try:
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
                entry[f"sm_{arch}"] = {"ok": True, "shared_bytes": compiled.metadata.shared}
                entry["int64_program_ids"] = widened_program_ids(compiled.asm["ttir"])
            except Exception as err:  # every failure reported, not only the first
                entry[f"sm_{arch}"] = {"ok": False, "error": _root_cause(err)}
        results.append(entry)
    launched = {op for entry in results for op in entry["ops"]}
    return {
        "triton": triton.__version__,
        "ops": ops,
        "ops_without_launches": sorted(set(ops) - launched),  # pure torch inside: nothing to build
        "kernels": results,
        "failures": sum(not e[f"sm_{a}"]["ok"] for e in results for a in archs),
    }


def widened_program_ids(ttir: str) -> bool:
    """Whether every program id the kernel reads is widened to 64 bits before use (TTIR:
    `%x = tt.get_program_id` then `arith.extsi %x`): 32-bit offsets of tokens x n x C wrap
    past 2^31 elements (128K tokens of 4 x 7168 streams) without an error."""
    ids = re.findall(r"(%[\w.]+) = tt\.get_program_id", ttir)
    return bool(ids) and all(re.search(rf"arith\.extsi {re.escape(i)}\b", ttir) for i in ids)


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"[-1200:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=inspect.cleandoc(__doc__).splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="e.g. 90 (H100/H200)")
    parser.add_argument("--step-model", default="tiny",
                        help="the recipe model whose bf16 training step's launches are compiled "
                        "too ('none': the doctor's examples only)")  # fmt: skip
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_build: unset TRITON_INTERPRET (it makes kernels uncompilable)")
        return 2
    report = build(args.arch, None if args.step_model == "none" else args.step_model)
    print(json.dumps(report, indent=1))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
