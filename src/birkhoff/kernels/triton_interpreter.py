"""Triton's CPU interpreter (TRITON_INTERPRET=1: the tests, and a triton run on the CPU) made
to run liger-kernel's kernels as compiled Triton runs them.

The interpreter departs from the compiler in three places that liger's kernels reach (our own
kernels reach none: they take no float they call methods on, and compute in float32):
- a float argument reaches the kernel as a Python float, where the compiler passes an fp32
  scalar; liger's kernels call `.to(tl.float32)` on theirs (RMSNorm's eps, SwiGLU's gate
  multiplier), which a Python float lacks;
- a libdevice function bound by name at import (liger's `rsqrt`) has no interpreted body: the
  interpreter swaps in its own versions of `tl.math` only, and only for the kernel's call;
- bfloat16 values are held as their raw 16 bits, and arithmetic on two of them runs on those
  bits as integers (liger's SwiGLU multiplies two bf16 rows: 1e38 where 0.07 is right). Here
  it runs in float32 and is rounded back to bf16, as the GPU's bf16 arithmetic does.

`adapt_for_liger(module)` mends all three for one liger module when the interpreter is on, and
is a no-op otherwise: compiled Triton (a GPU, and `launch/triton_build`'s compile check) always
runs liger's code unchanged. The float and bf16 mends hold for the rest of the process, so our
kernels then also see fp32 scalars and rounded bf16, as compiled they do (tests/test_kernels.py
passes with and without them).
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np
import triton
import triton.language as tl

_ADAPTED = "_birkhoff_interpreter_adapted"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _rsqrt(x):
    # Resolved through tl.math at call time, which the interpreter has swapped for its own.
    return tl.math.rsqrt(x)


def adapt_for_liger(module: ModuleType) -> ModuleType:
    """`module` (a liger_kernel.ops module), runnable by the interpreter when it is on."""
    if not interpreting() or getattr(module, _ADAPTED, False):
        return module
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
    if hasattr(module, "rsqrt"):
        module.rsqrt = _rsqrt
    setattr(module, _ADAPTED, True)
    return module


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

    for name, fn in (("binary_op", binary_op), ("unary_op", unary_op)):
        setattr(fn, _ADAPTED, True)
        setattr(builder, name, fn)
