"""Where this process stands in a (possibly multi-node) job: from the recipe, else from SLURM."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from birkhoff.errors import require
from birkhoff.launch.config import LaunchConfig


@dataclass(frozen=True)
class Topology:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    rdzv_endpoint: str | None  # None: a single node meeting on localhost
    rdzv_id: str
    stop_timeout_s: int = 120  # what ranks get, after a signal, to stop cleanly
    max_restarts: int = 0  # the elastic agent's restarts of this node's ranks

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def resolve_topology(cfg: LaunchConfig, env: Mapping[str, str]) -> Topology:
    """Recipe values win; missing ones come from SLURM_* variables when a SLURM job is running."""
    slurm = "SLURM_JOB_ID" in env
    nnodes = cfg.nnodes or (int(env.get("SLURM_NNODES", 1)) if slurm else 1)
    node_rank = cfg.node_rank
    if node_rank is None:
        node_rank = int(env.get("SLURM_NODEID", 0)) if slurm else 0
    endpoint = cfg.rdzv_endpoint
    if endpoint is None and slurm and nnodes > 1:
        endpoint = f"{first_host(env['SLURM_JOB_NODELIST'])}:{cfg.rdzv_port}"
    require(
        nnodes == 1 or endpoint is not None,
        "launch.rdzv_endpoint",
        endpoint,
        f"a {nnodes}-node run needs the host:port of node 0 (or run inside SLURM)",
    )
    require(
        0 <= node_rank < nnodes, "launch.node_rank", node_rank, f"must be in [0, nnodes={nnodes})"
    )
    rdzv_id = cfg.rdzv_id or (env["SLURM_JOB_ID"] if slurm else "birkhoff")
    return Topology(
        nnodes,
        node_rank,
        cfg.nproc_per_node,
        endpoint,
        rdzv_id,
        cfg.stop_timeout_s,
        cfg.max_restarts,
    )


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\]([^,\[]*))?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix
