"""Model FLOPs utilisation, reported every step: the model FLOPs the step's tokens need (the
planner's count: 6 x active matmul parameters plus the attention of each layer type,
compressed and sparse attention included, no recomputation) over what the run's devices
could do at their peak in the time the step took.

The peak per device: `backend.peak_tflops` if set; an accelerator's dense bf16 figure from
the cluster presets (matched on the device's name); on the CPU, the matmul rate measured
once on this machine in the dtype the run multiplies in, and cached in the machine's cache
dir (keyed by the CPU, the thread count, torch's version and the dtype) so later runs do not
pay the measurement.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from birkhoff.atomic import write_text_atomic
from birkhoff.errors import RecipeError
from birkhoff.machine_cache import machine_cache_dir
from birkhoff.model.config import ModelConfig
from birkhoff.parallel.planning.cluster import PRESETS
from birkhoff.parallel.planning.estimate import model_flops_per_token
from birkhoff.parallel.planning.inventory import build_inventory
from birkhoff.parallel.planning.layout import Workload

# Device names (as torch reports them) to presets; the first match wins.
DEVICE_PRESETS = (
    ("H200", "h200"),
    ("H800", "h800"),
    ("H100", "h100"),
    ("B200", "b200"),
    ("910B", "ascend_910b"),
    ("910C", "ascend_910c"),
)
CPU_PEAK_FILE = "cpu_matmul_peak.json"


@dataclass(frozen=True)
class Peak:
    tflops: float  # per device
    source: str  # how it was found: recipe, a preset's name, or measured


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of `cfg` at `seq_len` (the planner's count)."""
    return model_flops_per_token(build_inventory(cfg), Workload(global_batch=1, seq_len=seq_len))


def device_peak(
    device: torch.device, override: float | None, dtype: torch.dtype, cache: Path
) -> Peak:
    """The peak TFLOP/s of one device (module docstring)."""
    if override is not None:
        return Peak(override, "backend.peak_tflops")
    if device.type == "cpu":
        return Peak(cpu_matmul_peak(dtype, cache), f"measured on this CPU ({dtype})")
    name = _device_name(device)
    for marker, preset in DEVICE_PRESETS:
        if marker in name:
            return Peak(PRESETS[preset]["peak_tflops"], f"{preset} preset")
    raise RecipeError(
        "backend.peak_tflops",
        override,
        f"no bf16 peak is known for device {name!r}; set it "
        "to the device's dense bf16 TFLOP/s (it only scales the mfu metric)",
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":  # torch_npu registers torch.npu
        return torch.npu.get_device_name(device)  # type: ignore[attr-defined]
    return device.type


PEAK_SIZE, PEAK_MATMUL_S = 1024, 0.05


def cpu_matmul_peak(dtype: torch.dtype, cache: Path, refresh: bool = False) -> float:
    """The best rate of timed square matmuls on this CPU, in TFLOP/s: from the cache, or
    measured (always with `refresh`, as `birkhoff doctor` does) and cached as the best this
    machine has shown, so a measurement taken while other work loaded the cores does not
    stay the peak. The matrices are 1024 wide, or narrower where one product would take
    over PEAK_MATMUL_S (a dtype without native kernels, e.g. bfloat16 on a CPU without its
    instructions, took 3.1 s per product and 66 s to measure at 1024)."""
    key = f"{platform.processor() or platform.machine()}|{torch.get_num_threads()}|"
    key += f"{torch.__version__}|{dtype}"
    path = cache / CPU_PEAK_FILE
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key in known and not refresh:
        return float(known[key])
    probe = torch.randn(PEAK_SIZE // 4, PEAK_SIZE // 4, dtype=dtype)
    torch.mm(probe, probe)
    start = time.perf_counter()
    torch.mm(probe, probe)  # a quarter of the width: 1/64 of the time
    wide = PEAK_SIZE // 4 * (PEAK_MATMUL_S / (time.perf_counter() - start)) ** (1 / 3)
    size = min(PEAK_SIZE, max(128, int(wide) // 64 * 64))
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - start) / 4)
    tflops = max(2 * size**3 / best / 1e12, float(known.get(key, 0.0)))
    write_text_atomic(path, json.dumps({**known, key: tflops}, indent=1))  # ranks race: whole files
    return tflops


def mfu_meter(recipe, device: torch.device, devices: int, cache: Path | None = None) -> MFUMeter:
    """The meter of a run of `recipe` on `devices` devices like `device`."""
    cache = cache or machine_cache_dir()  # not data.cache_dir: a property of the machine
    dtype = torch.bfloat16 if recipe.train.mixed_precision == "bf16" else torch.float32
    return MFUMeter(
        flops_per_token(recipe.model, recipe.data.seq_len),
        device_peak(device, recipe.backend.peak_tflops, dtype, cache),
        devices,
    )


@dataclass(frozen=True)
class MFUMeter:
    flops_per_token: float
    peak: Peak
    devices: int

    def mfu(self, tokens_per_s: float) -> float:
        """The share of the devices' peak the model's FLOPs at this rate take."""
        return tokens_per_s * self.flops_per_token / (self.devices * self.peak.tflops * 1e12)
