"""The cluster a plan is for: how many devices, their memory and bf16 peak, and the bandwidth
within and between nodes. Presets carry public vendor figures (dense bf16, no sparsity; one
direction per device); a recipe's `cluster.*` keys override any of them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from birkhoff.errors import RecipeError, require


@dataclass(frozen=True)
class Cluster:
    name: str
    devices: int
    device_memory_gib: float
    peak_tflops: float  # dense bf16 per device
    intra_node_gbps: float  # GB/s per device to the other devices of its node, one direction
    inter_node_gbps: float  # GB/s per device to other nodes (its share of the node's NICs)
    node_size: int  # devices per node (the fast domain)
    host_gbps: float = 64.0  # GB/s between a device and host memory, one direction (PCIe)
    # AdamW steps with foreach kernels, which hold one more float32 copy of what it updates
    # (torch's default on accelerators the trainer takes no fused step on); false: fused
    # (CUDA, Ascend, a CPU) or tensor by tensor (DTensors mixed with plain tensors), no copy
    foreach_optimizer: bool = True
    # share of the bf16 peak the step's matmuls reach: large fused training kernels ~0.6; an
    # H200 running this project's eager kernels on a 16B-class shape reached 0.118 (README)
    matmul_efficiency: float = 0.6
    memory_gbps: float = 3350.0  # device memory (HBM) bandwidth, GB/s
    # share of it that streaming elementwise kernels reach (traffic.py)
    memory_efficiency: float = 0.8
    # host time per kernel launch of eager PyTorch (dispatch, autograd, launch): 28.1 us on
    # the H200 machine of the README (tiny's eager step, 167 ms, over its 5,941 launches)
    launch_us: float = 28.1

    def validate(self) -> None:
        for key in ("devices", "node_size"):
            value = getattr(self, key)
            require(value >= 1, f"cluster.{key}", value, "must be >= 1")
        speeds = ("intra_node_gbps", "inter_node_gbps", "host_gbps", "memory_gbps", "launch_us")
        for key in ("device_memory_gib", "peak_tflops", *speeds):
            value = getattr(self, key)
            require(value > 0, f"cluster.{key}", value, "must be > 0")
        efficiency = self.matmul_efficiency
        require(0 < efficiency <= 1, "cluster.matmul_efficiency", efficiency,
                "must be in (0, 1]: the share of peak_tflops the matmuls reach")  # fmt: skip
        efficiency = self.memory_efficiency
        require(0 < efficiency <= 1, "cluster.memory_efficiency", efficiency,
                "must be in (0, 1]: the share of memory_gbps kernels reach")  # fmt: skip
        flag = self.foreach_optimizer
        require(isinstance(flag, bool), "cluster.foreach_optimizer", flag, "must be true or false")
        require(
            self.devices % self.node_size == 0 or self.devices < self.node_size,
            "cluster.devices",
            self.devices,
            f"must be a multiple of cluster.node_size={self.node_size} (whole nodes)",
        )


# NVLink figures are per GPU, one direction (H100/H200 NVLink 4: 450 GB/s; H800: 200 GB/s;
# B200 NVLink 5: 900 GB/s); one 400 Gb/s NIC per GPU gives 50 GB/s. Ascend 910B: HCCS, 7
# links x 28 GB/s per direction inside a node, 200 Gb/s RoCE per NPU; 910C: CloudMatrix's
# unified bus, 392 GB/s per NPU inside a supernode, counted here as nodes of 8. Host links:
# PCIe 5.0 x16, 64 GB/s per direction (H100, H200, H800, B200); 910B PCIe 4.0 x16, 32 GB/s;
# 910C assumed as 910B. Device memory: H100, H800 SXM 3.35 TB/s; H200 4.8 TB/s; B200 8 TB/s;
# 910B 1.6 TB/s (HBM2e); 910C two 910B dies, 3.2 TB/s.
PCIE5, PCIE4 = 64, 32
PRESETS: dict[str, dict[str, Any]] = {
    "h100": dict(
        device_memory_gib=80, peak_tflops=989, intra_node_gbps=450, inter_node_gbps=50,
        host_gbps=PCIE5, memory_gbps=3350,
    ),
    "h200": dict(
        device_memory_gib=141, peak_tflops=989, intra_node_gbps=450, inter_node_gbps=50,
        host_gbps=PCIE5, memory_gbps=4800,
    ),
    "h800": dict(
        device_memory_gib=80, peak_tflops=989, intra_node_gbps=200, inter_node_gbps=50,
        host_gbps=PCIE5, memory_gbps=3350,
    ),
    "b200": dict(
        device_memory_gib=180, peak_tflops=2250, intra_node_gbps=900, inter_node_gbps=50,
        host_gbps=PCIE5, memory_gbps=8000,
    ),
    "ascend_910b": dict(
        device_memory_gib=64, peak_tflops=313, intra_node_gbps=196, inter_node_gbps=25,
        host_gbps=PCIE4, memory_gbps=1600,
    ),
    "ascend_910c": dict(
        device_memory_gib=128, peak_tflops=752, intra_node_gbps=392, inter_node_gbps=50,
        host_gbps=PCIE4, memory_gbps=3200,
    ),
}  # fmt: skip
# the kernel backend `backend.kernels=auto` runs on each preset's devices
PRESET_KERNELS = {"h100": "triton", "h200": "triton", "h800": "triton", "b200": "triton"}
PRESET_KERNELS |= {"ascend_910b": "npu", "ascend_910c": "npu"}


def cluster_from(values: dict[str, Any]) -> Cluster:
    """A Cluster from the recipe's `cluster` section: `preset` and any overrides."""
    values = {k: v for k, v in values.items() if v is not None}
    preset = values.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise RecipeError("cluster.preset", preset, f"must be one of {', '.join(PRESETS)}")
    # every preset's devices take AdamW's fused step (CUDA's and Ascend's: train/optim.py,
    # adamw_step_kind); a custom cluster's may not: foreach, the larger estimate
    foreach = preset is None
    base = {"name": preset or "custom", "node_size": 8, "foreach_optimizer": foreach}
    base["matmul_efficiency"] = Cluster.matmul_efficiency
    base["memory_efficiency"] = Cluster.memory_efficiency
    base["launch_us"] = Cluster.launch_us
    base |= PRESETS.get(preset or "", {})
    given = values
    unknown = sorted(set(given) - set(Cluster.__dataclass_fields__))
    if unknown:
        raise RecipeError(f"cluster.{unknown[0]}", given[unknown[0]], "is not a cluster key")
    merged = {**base, **given}
    missing = sorted(set(Cluster.__dataclass_fields__) - set(merged))
    if missing:
        raise RecipeError(
            f"cluster.{missing[0]}",
            None,
            f"must be set (or pick cluster.preset: {', '.join(PRESETS)})",
        )
    cluster = Cluster(**merged)
    cluster.validate()
    return replace(cluster)
