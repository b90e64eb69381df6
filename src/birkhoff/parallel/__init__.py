"""Process groups, device selection and the parallel wrappers applied to a model from outside."""

from birkhoff.parallel.config import ParallelConfig
from birkhoff.parallel.device import resolve_device
from birkhoff.parallel.distributed import DistributedContext, distributed

__all__ = [
    "DistributedContext",
    "ParallelConfig",
    "distributed",
    "resolve_device",
]
