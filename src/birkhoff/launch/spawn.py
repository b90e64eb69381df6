"""Start the ranks of this node with torchrun's elastic launcher (torch.distributed.launcher)."""

from __future__ import annotations

import uuid
from typing import Any

from torch.distributed.launcher.api import LaunchConfig as ElasticConfig
from torch.distributed.launcher.api import elastic_launch

from birkhoff.launch.topology import Topology
from birkhoff.train import run_rank


def elastic_config(topology: Topology, max_restarts: int) -> ElasticConfig:
    """The same settings torchrun derives from its flags (a single node meets on localhost)."""
    single_node = topology.nnodes == 1 and topology.rdzv_endpoint is None
    return ElasticConfig(
        min_nodes=topology.nnodes,
        max_nodes=topology.nnodes,
        nproc_per_node=topology.nproc_per_node,
        run_id=str(uuid.uuid4()) if single_node else topology.rdzv_id,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if single_node else topology.rdzv_endpoint,
        rdzv_configs={"is_host": topology.node_rank == 0},
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )


def launch_ranks(
    topology: Topology, max_restarts: int, recipe: dict[str, Any], run_dir: str
) -> dict[str, Any] | None:
    """Run every local rank to completion; the summary of global rank 0 if it is on this node."""
    results = elastic_launch(elastic_config(topology, max_restarts), run_rank)(recipe, run_dir)
    return results.get(0)
