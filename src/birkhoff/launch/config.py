"""The `launch` recipe section: how many processes, on how many nodes, meeting where."""

from __future__ import annotations

from dataclasses import dataclass

from birkhoff.errors import require


@dataclass
class ClusterConfig:
    """The cluster `birkhoff plan` plans for; training ignores it. `preset` (h100, h200, h800,
    b200, ascend_910b, ascend_910c) fills the figures, any key given overrides it; `devices`
    defaults to launch.nnodes x launch.nproc_per_node."""

    preset: str | None = None
    devices: int | None = None
    device_memory_gib: float | None = None
    peak_tflops: float | None = None  # dense bf16 per device
    intra_node_gbps: float | None = None  # GB/s per device inside a node, one direction
    inter_node_gbps: float | None = None  # GB/s per device across nodes
    node_size: int | None = None
    host_gbps: float | None = None  # GB/s between a device and host memory (PCIe), one direction
    foreach_optimizer: bool | None = None  # AdamW's foreach step; None: on a custom cluster only
    matmul_efficiency: float | None = None  # share of the bf16 peak the matmuls reach; None: 0.6
    memory_gbps: float | None = None  # device memory (HBM) bandwidth, GB/s
    memory_efficiency: float | None = None  # share of it elementwise kernels reach; None: 0.8
    launch_us: float | None = None  # host time per eager kernel launch (plan --launches); 28.1


@dataclass
class LaunchConfig:
    """Left null, `nnodes`, `node_rank`, `rdzv_endpoint` and `rdzv_id` come from SLURM's
        environment inside a SLURM job, else mean one node on this machine. `stop_timeout_s`: on
        SIGTERM/SIGINT the launcher passes the signal to its ranks and gives them this long to
        finish their step and write the checkpoint before it kills them. `collective_timeout_s`: how
    long any collective may wait for the other ranks before the run fails (null: torch's
    defaults, 10 min on NCCL, 30 min on gloo). `max_restarts`: how often torchrun's elastic agent
    restarts the ranks of this node after one failed (a crash, kill -9, a hang); a restarted
    run resumes from its newest complete checkpoint."""

    nproc_per_node: int = 1
    nnodes: int | None = None
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_port: int = 29500
    rdzv_id: str | None = None
    stop_timeout_s: int = 120
    collective_timeout_s: float | None = 1800
    max_restarts: int = 0

    def validate(self, prefix: str = "launch") -> None:
        require(
            self.nproc_per_node > 0,
            f"{prefix}.nproc_per_node",
            self.nproc_per_node,
            "must be a positive integer (processes on this node, usually one per device)",
        )
        require(
            self.nnodes is None or self.nnodes > 0,
            f"{prefix}.nnodes",
            self.nnodes,
            "must be null (from SLURM, else 1) or a positive integer",
        )
        if self.nnodes is not None and self.node_rank is not None:
            require(
                0 <= self.node_rank < self.nnodes,
                f"{prefix}.node_rank",
                self.node_rank,
                f"must be in [0, launch.nnodes={self.nnodes})",
            )
        require(
            self.stop_timeout_s > 0,
            f"{prefix}.stop_timeout_s",
            self.stop_timeout_s,
            "must be a positive number of seconds (longer than a step plus a checkpoint save)",
        )
        require(
            self.collective_timeout_s is None or self.collective_timeout_s > 0,
            f"{prefix}.collective_timeout_s",
            self.collective_timeout_s,
            "must be null (torch's defaults) or a positive number of seconds",
        )
        require(
            self.max_restarts >= 0,
            f"{prefix}.max_restarts",
            self.max_restarts,
            "must be >= 0 (0: a failed rank ends the run)",
        )
        require(
            0 < self.rdzv_port < 65536,
            f"{prefix}.rdzv_port",
            self.rdzv_port,
            "must be a TCP port in 1..65535",
        )
