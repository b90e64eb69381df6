"""Op registry: `get(op, backend)` returns the backend's implementation or the reference one.

The table is filled once at import by the backend modules and never changes afterwards, so it is
not run-time mutable state: which backend a model uses is an argument, not a global switch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

REFERENCE = "reference"
_OPS: dict[tuple[str, str], Callable[..., Any]] = {}


def register(op: str, backend: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding `fn` as the `backend` implementation of `op`."""

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = (op, backend)
        if key in _OPS:
            raise ValueError(f"kernel {op!r} is already registered for backend {backend!r}")
        _OPS[key] = fn
        return fn

    return add


def get(op: str, backend: str = REFERENCE) -> Callable[..., Any]:
    """The implementation of `op` for `backend`, falling back to the reference implementation."""
    _load_backends()
    if (op, backend) in _OPS:
        return _OPS[(op, backend)]
    if (op, REFERENCE) in _OPS:
        return _OPS[(op, REFERENCE)]
    known = sorted({name for name, _ in _OPS})
    raise KeyError(f"unknown kernel {op!r}; known kernels: {', '.join(known)}")


def available_backends() -> list[str]:
    """Backends whose modules import on this machine (reference always)."""
    _load_backends()
    return sorted({backend for _, backend in _OPS} | {REFERENCE})


def _load_backends() -> None:
    # Importing a backend module registers its ops; importing twice is a no-op. Accelerator
    # backends (Triton, torch_npu) will be imported here only where their packages import.
    from birkhoff.kernels import reference  # noqa: F401
