"""Named hot ops with per-backend implementations; `reference` (plain torch) always exists."""

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
    "ops",
    "register",
]
