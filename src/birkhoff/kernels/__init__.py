"""Named hot ops with per-backend implementations; `reference` (plain torch) always exists."""

from birkhoff.kernels.registry import available_backends, get, register

__all__ = ["available_backends", "get", "register"]
