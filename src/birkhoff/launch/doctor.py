"""`birkhoff doctor [--json] [--backend NAME] [--ranks N] [--run-dir DIR]`: what this machine
can run. Versions (python, torch, triton, torch_npu and CANN where present, transformers),
the device and its memory, every op of the kernel backend this device runs against the
reference (forward and backward error, time ratio, which implementation ran), the local
ranks' collectives (correct values, bus bandwidth) and the run dir's filesystem (writable
with an atomic rename, free space, type). One line per problem with its fix; exit code 1 if
there is any."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from birkhoff import kernels
from birkhoff.checkpoint.space import free_bytes
from birkhoff.errors import RecipeError
from birkhoff.launch.doctor_collectives import local_collectives
from birkhoff.launch.doctor_kernels import check_kernels
from birkhoff.machine_cache import machine_cache_dir
from birkhoff.parallel.device import resolve_device
from birkhoff.train.host_malloc import glibc_version
from birkhoff.train.mfu import cpu_matmul_peak

MIN_FREE_GIB = 10.0  # a checkpoint of a small run, and the token caches


@dataclass
class Report:
    versions: dict[str, str | None]
    device: dict
    kernels: dict = field(default_factory=dict)
    triton_build: dict = field(default_factory=dict)
    collectives: dict = field(default_factory=dict)
    filesystem: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def doctor(backend: str, ranks: int | None, run_dir: Path) -> Report:
    device = resolve_device("auto", 0)
    report = Report(_versions(), _device(device))
    try:
        resolved = kernels.backend_for(backend, device.type)
    except RecipeError as err:
        report.problems.append(f"kernels: {err}")
        resolved = None
    if resolved is not None:
        report.kernels = check_kernels(resolved, device)
        for op, result in report.kernels["ops"].items():
            if not result["ok"]:
                report.problems.append(
                    f"kernel {op} ({result['implementation']}): {result['problem']}; run "
                    f"with backend.kernels=reference until it is fixed"
                )
    if resolved == "triton" and device.type == "cpu":  # interpreted here: compile them too
        report.triton_build = _triton_build(report.problems)
    count = ranks or (torch.accelerator.device_count() if device.type != "cpu" else 2)
    if count >= 2:
        report.collectives = local_collectives(device.type, count)
        for name, result in report.collectives.items():
            if not result["ok"]:
                library = {"cuda": "NCCL", "npu": "HCCL"}.get(device.type, "gloo")
                report.problems.append(
                    f"collective {name} among {count} local ranks returned wrong values (max "
                    f"error {result['max_error']:g}); check the driver and the {library} "
                    "installation"
                )
    report.filesystem = _filesystem(run_dir, report.problems)
    return report


def _triton_build(problems: list[str]) -> dict:
    """Triton's interpreter enforces none of its compiler's rules: on a CPU the doctor also
    compiles every kernel the backend launches on its examples for Hopper
    (launch/triton_build.py, in a process without TRITON_INTERPRET; the bf16 training step's
    launches too take that command without `--step-model none`, half a minute more)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "birkhoff.launch.triton_build", "--arch", "90"]
    command += ["--step-model", "none"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        problems.append(f"triton build: did not run ({done.stderr.strip()[-300:]})")
        return {"ok": False}
    failed = [e for e in report["kernels"] if not e["sm_90"]["ok"]]
    for entry in failed:
        error = entry["sm_90"]["error"].splitlines()[-1][:300]
        problems.append(f"triton kernel {entry['kernel']} does not compile for sm_90: {error}")
    return {"ok": not failed, "arch": "sm_90", "kernels": len(report["kernels"]),
            "failed": [e["kernel"] for e in failed], "triton": report["triton"]}  # fmt: skip


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "triton", "torch_npu", "transformers", "birkhoff"):
        try:
            versions[package] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["cuda"] = torch.version.cuda
    versions["cann"] = _cann_version()
    versions["libc"] = glibc_version()  # glibc: backend.host_malloc=reuse can apply
    return versions


def _cann_version() -> str | None:
    """The CANN toolkit's version file, where the toolkit is installed (set_env.sh sets its
    path)."""
    home = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
    if not home:
        return None
    for name in ("version.cfg", "version.info"):
        path = Path(home) / name
        if path.is_file():
            for line in path.read_text().splitlines():
                if "version" in line.lower() and "=" in line:
                    return line.split("=", 1)[1].strip()
    return "unknown (no version file under the toolkit)"


def _device(device: torch.device) -> dict:
    if device.type == "cpu":
        meminfo = Path("/proc/meminfo")
        total = None
        if meminfo.is_file():
            kib = meminfo.read_text().split("MemTotal:")[1].split()[0]
            total = int(kib) / 2**20
        name = platform.processor() or platform.machine()
        # measured again each time (the cache keeps the best seen: the mfu metric's peak)
        peak = cpu_matmul_peak(torch.float32, machine_cache_dir(), refresh=True)
        return {
            "type": "cpu",
            "name": name,
            "count": os.cpu_count(),
            "memory_gib": total,
            "matmul_tflops_float32": peak,
        }
    count = torch.accelerator.device_count()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, total = props.name, props.total_memory / 2**30
    else:
        name = torch.npu.get_device_name(device)  # type: ignore[attr-defined]
        total = torch.npu.get_device_properties(device).total_memory / 2**30  # type: ignore[attr-defined]
    return {"type": device.type, "name": name, "count": count, "memory_gib": total}


def _filesystem(run_dir: Path, problems: list[str]) -> dict:
    """Writable with the checkpoints' pattern (a temporary name renamed into place), free
    space, and the filesystem's type (from the mount table)."""
    run_dir = run_dir.resolve()
    probe_dir = run_dir if run_dir.exists() else next(p for p in run_dir.parents if p.exists())
    result: dict = {"path": str(run_dir), "checked": str(probe_dir)}
    staged, final = probe_dir / f".birkhoff-doctor.{os.getpid()}", probe_dir / ".birkhoff-doctor"
    try:
        staged.write_bytes(b"x" * 4096)
        staged.replace(final)
        final.unlink()
        result["writable"] = True
    except OSError as err:
        result["writable"] = False
        problems.append(
            f"run dir {probe_dir}: not writable ({err.strerror}); choose another with "
            "hydra.run.dir=..."
        )
    free = free_bytes(probe_dir) / 2**30
    result["free_gib"] = free
    if free < MIN_FREE_GIB:
        problems.append(
            f"run dir {probe_dir}: {free:.1f} GiB free, under {MIN_FREE_GIB:g} GiB; "
            "free space or move the run dir"
        )
    result["type"] = _mount_type(probe_dir)
    return result


def _mount_type(path: Path) -> str | None:
    mounts = Path("/proc/mounts")
    if not mounts.is_file():
        return None
    best, kind = "", None
    for line in mounts.read_text().splitlines():
        _, point, fs_type, *_ = line.split()
        if str(path).startswith(point) and len(point) > len(best):
            best, kind = point, fs_type
    return kind


def doctor_command(args: list[str]) -> int:
    """Parse the doctor's flags, run it, print the report; 1 if a problem was found, 2 for
    bad flags."""
    options = {"--backend": "auto", "--ranks": None, "--run-dir": "."}
    as_json = "--json" in args
    rest = [a for a in args if a != "--json"]
    while rest:
        flag = rest.pop(0)
        if flag not in options or not rest:
            print(
                f"birkhoff: doctor: unknown or incomplete flag {flag!r}; usage: birkhoff "
                "doctor [--json] [--backend auto|reference|cpu|triton|npu] [--ranks N] "
                "[--run-dir DIR]",
                file=sys.stderr,
            )
            return 2
        options[flag] = rest.pop(0)
    if options["--backend"] not in kernels.KERNEL_CHOICES:
        print(
            f"birkhoff: doctor: --backend {options['--backend']}: must be one of "
            f"{', '.join(kernels.KERNEL_CHOICES)}",
            file=sys.stderr,
        )
        return 2
    ranks = options["--ranks"]
    if ranks is not None and not (ranks.isdigit() and int(ranks) >= 1):
        print(
            f"birkhoff: doctor: --ranks {ranks}: must be a positive number of local ranks "
            "(1: no collectives)",
            file=sys.stderr,
        )
        return 2
    report = doctor(options["--backend"], int(ranks) if ranks else None, Path(options["--run-dir"]))
    print(json.dumps(asdict(report), indent=1) if as_json else _text(report))
    return 1 if report.problems else 0


def _text(report: Report) -> str:
    lines = ["versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items() if v)]
    d = report.device
    memory = f", {d['memory_gib']:.0f} GiB" if d.get("memory_gib") else ""
    peak = d.get("matmul_tflops_float32")
    rate = f", float32 matmul {peak:.3g} TFLOP/s (best seen: the mfu peak)" if peak else ""
    lines.append(f"device: {d['count']} x {d['type']} {d['name']}{memory}{rate}")
    if report.kernels:
        lines.append(report.kernels["summary"])
        for op, r in report.kernels["ops"].items():
            errors = f"forward {r['forward_error']:.1e}"
            if not math.isnan(r["backward_error"]):  # nan: forward only, the note says why
                errors += f", backward {r['backward_error']:.1e}"
            if "note" in r:
                errors += f" ({r['note']})"
            speed = (
                ""
                if math.isnan(r["speed_ratio"])
                else f", reference / op time {r['speed_ratio']:.3g}"
            )
            lines.append(
                f"  {op}: {r['implementation']}, {errors}{speed}{'' if r['ok'] else '  FAILED'}"
            )
    build = report.triton_build
    if build.get("kernels"):
        lines.append(
            f"triton kernels compiled for {build['arch']} (Triton {build['triton']}): "
            f"{build['kernels'] - len(build['failed'])} of {build['kernels']}"
        )
    for name, r in report.collectives.items():
        lines.append(
            f"collective {name}: {'ok' if r['ok'] else 'WRONG'}, "
            f"{r['bus_gbps']:.2f} GB/s bus bandwidth ({r['payload_mib']:g} MiB)"
        )
    fs = report.filesystem
    lines.append(
        f"run dir {fs['checked']}: {'writable' if fs.get('writable') else 'NOT writable'}"
        f", {fs['free_gib']:.0f} GiB free, {fs.get('type')}"
    )
    lines += [f"problem: {p}" for p in report.problems] or ["no problems found"]
    return "\n".join(lines)
