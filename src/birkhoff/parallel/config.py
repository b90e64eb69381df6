"""The `parallel` recipe section."""

from __future__ import annotations

from dataclasses import dataclass

from birkhoff.errors import require


@dataclass
class ParallelConfig:
    """`dp_replicate`: data-parallel replicas; -1 takes every rank of the world."""

    dp_replicate: int = -1

    def resolved_dp(self, world_size: int) -> int:
        return world_size if self.dp_replicate == -1 else self.dp_replicate

    def validate(self, world_size: int, prefix: str = "parallel") -> None:
        require(
            self.dp_replicate == -1 or self.dp_replicate > 0,
            f"{prefix}.dp_replicate",
            self.dp_replicate,
            "must be -1 (all ranks) or a positive integer",
        )
        dp = self.resolved_dp(world_size)
        require(
            dp == world_size,
            f"{prefix}.dp_replicate",
            self.dp_replicate,
            f"the product of parallel degrees must equal the world size {world_size} "
            f"(nnodes x nproc_per_node); use dp_replicate={world_size} or -1",
        )
