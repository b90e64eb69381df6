"""Triton's CPU interpreter (TRITON_INTERPRET=1: the tests, and a triton run on the CPU) made
to compute as compiled Triton does, for liger-kernel's kernels and ours.

The interpreter departs from the compiler in four places:
- a float argument reaches the kernel as a Python float, where the compiler passes an fp32
  scalar; liger's kernels call `.to(tl.float32)` on theirs (RMSNorm's eps, SwiGLU's gate
  multiplier), which a Python float lacks;
- a libdevice function bound by name at import (liger's `rsqrt`) has no interpreted body: the
  interpreter swaps in its own versions of `tl.math` only, and only for the kernel's call;
- bfloat16 values are held as their raw 16 bits, and arithmetic on two of them runs on those
  bits as integers (liger's SwiGLU multiplies two bf16 rows: 1e38 where 0.07 is right). Here
  it runs in float32 and is rounded back to bf16, as the GPU's bf16 arithmetic does; a
  `tl.dot` of bf16 blocks multiplies them in float32 (the GPU's bf16 products are exact in
  its float32 accumulator);
- a float32 value cast to bfloat16 (explicitly, or stored through a bf16 pointer) loses its
  low 16 bits, where the compiler rounds to the nearest even: every bf16 output of every
  kernel was up to one unit in the last place low. Here it is rounded.

`adapt_interpreter()` makes the three process-wide mends (importing birkhoff.kernels under
the interpreter calls it, before any kernel module runs: Triton decides at import whether
it interprets); `adapt_for_liger(module)` makes them and the rsqrt one for a liger
module. Both are no-ops without the interpreter: compiled Triton (a GPU, and
`launch/triton_build`'s compile check) runs every kernel unchanged.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np
import torch
import triton
import triton.language as tl

_ADAPTED = "_birkhoff_interpreter_adapted"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _rsqrt(x):
    # Resolved through tl.math at call time, which the interpreter has swapped for its own.
    return tl.math.rsqrt(x)


def adapt_interpreter() -> None:
    """The process-wide mends (fp32 scalars, bf16 arithmetic and rounding) when the
    interpreter is on; a no-op otherwise and when already made."""
    if not interpreting():
        return
    from triton.runtime import interpreter

    if not getattr(interpreter._implicit_cvt, _ADAPTED, False):
        convert = interpreter._implicit_cvt

        def fp32_scalars(arg):
            if isinstance(arg, float):  # the compiler's signature for a float: fp32
                value = interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32)
                return tl.tensor(value, tl.float32)
            return convert(arg)

        setattr(fp32_scalars, _ADAPTED, True)
        interpreter._implicit_cvt = fp32_scalars
    builder = type(interpreter.interpreter_builder)
    if not getattr(builder.binary_op, _ADAPTED, False):
        _bf16_arithmetic_in_float32(builder)
    if not getattr(builder.cast_impl, _ADAPTED, False):
        _bf16_rounded_to_nearest(builder, interpreter.TensorHandle)


def adapt_for_liger(module: ModuleType) -> ModuleType:
    """`module` (a liger_kernel.ops module), runnable by the interpreter when it is on."""
    if not interpreting() or getattr(module, _ADAPTED, False):
        return module
    adapt_interpreter()
    if hasattr(module, "rsqrt"):
        module.rsqrt = _rsqrt
    setattr(module, _ADAPTED, True)
    return module


def _bf16_rounded_to_nearest(builder: type, handle: type) -> None:
    """float32 -> bfloat16 rounded to the nearest even, as the compiler's conversion does (the
    interpreter drops the low 16 bits: up to a unit in the last place low, always towards 0)."""
    cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        wide = torch.from_numpy(np.array(src.data, dtype=np.float32))
        bits = wide.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return handle(bits, tl.bfloat16)

    setattr(cast_impl, _ADAPTED, True)
    builder.cast_impl = cast_impl


_COMPARISONS = (np.less, np.greater, np.less_equal, np.greater_equal, np.equal, np.not_equal)


def _bf16_arithmetic_in_float32(builder: type) -> None:
    binary, unary = builder.binary_op, builder.unary_op

    def widened(self, handle):
        return self.cast_impl(handle, tl.float32) if handle.dtype.scalar == tl.bfloat16 else handle

    def binary_op(self, lhs, rhs, op):
        if tl.bfloat16 not in (lhs.dtype.scalar, rhs.dtype.scalar):
            return binary(self, lhs, rhs, op)
        out = binary(self, widened(self, lhs), widened(self, rhs), op)
        return out if op in _COMPARISONS else self.cast_impl(out, tl.bfloat16)

    def unary_op(self, arg, op):
        if arg.dtype.scalar != tl.bfloat16:
            return unary(self, arg, op)
        return self.cast_impl(unary(self, widened(self, arg), op), tl.bfloat16)

    def create_dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
        # on the raw bits numpy would multiply integers; the GPU's products of bf16 values
        # are exact in its float32 accumulator, as they are in float32 here
        a, b = widened(self, a), widened(self, b)
        return dot(self, a, b, acc, input_precision, max_num_imprecise_acc)

    dot = builder.create_dot
    for name, fn in (("binary_op", binary_op), ("unary_op", unary_op), ("create_dot", create_dot)):
        setattr(fn, _ADAPTED, True)
        setattr(builder, name, fn)
