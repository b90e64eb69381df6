"""Named hot ops with per-backend implementations; `reference` (plain torch) always exists."""

import importlib.util
import os

if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
    # Triton's interpreter computing as compiled Triton does (kernels/triton_interpreter.py)
    # before any kernel module runs, the registry's or one imported on its own
    from birkhoff.kernels.triton_interpreter import adapt_interpreter

    adapt_interpreter()
from birkhoff.kernels.registry import (
    BACKENDS,
    KERNEL_CHOICES,
    auto_note,
    available_backends,
    backend_for,
    describe,
    dtypes_of,
    fallbacks,
    get,
    implementations,
    machine_lacks,
    ops,
    register,
)

__all__ = [
    "BACKENDS",
    "KERNEL_CHOICES",
    "auto_note",
    "available_backends",
    "backend_for",
    "describe",
    "dtypes_of",
    "fallbacks",
    "get",
    "implementations",
    "machine_lacks",
    "ops",
    "register",
]
