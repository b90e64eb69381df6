"""Start the ranks of this node with torchrun's elastic launcher (torch.distributed.launcher)."""

from __future__ import annotations

import signal
import sys
import uuid
from typing import Any

from torch.distributed.elastic.multiprocessing.api import SignalException
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
        shutdown_timeout=topology.stop_timeout_s,
    )


def launch_ranks(topology: Topology, recipe: dict[str, Any], run_dir: str) -> int:
    """Run every local rank of this node to completion (a failed rank raises ChildFailedError).
    Returns the exit status: 0, or 128 + N after signal N, which the launcher passed to the
    ranks (they finish their step and checkpoint, or are killed after stop_timeout_s)."""
    try:
        elastic_launch(elastic_config(topology), run_rank)(recipe, run_dir)
    except SignalException as stop:
        name = signal.Signals(stop.sigval).name
        print(
            f"birkhoff: {name}: passed to the ranks, which had {topology.stop_timeout_s} s "
            "(launch.stop_timeout_s) to finish their step and checkpoint; resume with "
            "train.resume=auto in the same run dir",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(stop.sigval)
    return 0
