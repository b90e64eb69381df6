"""Sharded, atomic checkpoints (torch.distributed.checkpoint) and exact resume."""

from birkhoff.checkpoint.config import CheckpointConfig
from birkhoff.checkpoint.manager import CheckpointError, CheckpointManager

__all__ = ["CheckpointConfig", "CheckpointError", "CheckpointManager"]
