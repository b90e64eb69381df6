"""Sharded, atomic checkpoints (torch.distributed.checkpoint) and exact resume."""

import warnings

from birkhoff.checkpoint.config import CheckpointConfig
from birkhoff.checkpoint.manager import CheckpointError, CheckpointManager

# DCP warns at every save and load in a single process that it assumes one process: a
# one-process run (and export, inspect) intends exactly that.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled", module="torch.distributed.checkpoint"
)

__all__ = ["CheckpointConfig", "CheckpointError", "CheckpointManager"]
