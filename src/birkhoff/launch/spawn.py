"""Start the ranks of this node with torchrun's elastic launcher (torch.distributed.launcher)."""

from __future__ import annotations

import uuid
from typing import Any

from torch.distributed.launcher.api import LaunchConfig as ElasticConfig
from torch.distributed.launcher.api import elastic_launch

from birkhoff.launch.topology import Topology
from birkhoff.train import run_rank


def elastic_config(topology: Topology) -> ElasticConfig:
    """The settings torchrun derives from its flags (a single node meets on localhost).

    No restarts: a restarted rank would train again from step 0 until checkpoint resume exists.
    """
    single_node = topology.nnodes == 1 and topology.rdzv_endpoint is None
    return ElasticConfig(
        min_nodes=topology.nnodes,
        max_nodes=topology.nnodes,
        nproc_per_node=topology.nproc_per_node,
        run_id=str(uuid.uuid4()) if single_node else topology.rdzv_id,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if single_node else topology.rdzv_endpoint,
        rdzv_configs={"is_host": topology.node_rank == 0},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )


def launch_ranks(topology: Topology, recipe: dict[str, Any], run_dir: str) -> None:
    """Run every local rank of this node to completion (a failed rank raises ChildFailedError)."""
    elastic_launch(elastic_config(topology), run_rank)(recipe, run_dir)
