"""Builds the `cpu` backend's C kernels (kernels/cpu_*.c) into a shared library once per source,
compiler and CPU, and loads it with ctypes: the same route inductor's CPU code takes (the
system's C compiler, OpenMP), with no torch headers, so a build takes about a second.

The library is cached in the machine's cache (`kernels/` under $BIRKHOFF_CACHE_DIR, default
~/.cache/birkhoff), named by a hash of the source, the compiler's command (with CC's
arguments) and version, the flags and the CPU's instruction sets (-march=native), and
written under a temporary name and renamed: ranks that build at once each finish with a
whole file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from birkhoff.machine_cache import machine_cache_dir

SOURCES = (
    "cpu_streams.c",
    "cpu_sinkhorn.c",
    "cpu_mhc_read.c",
    "cpu_rows.c",
    "cpu_engram.c",
    "cpu_v4_attention.c",
    "cpu_kv_compress.c",
    "cpu_moe.c",
    "cpu_gather.c",
    "cpu_cross_entropy.c",
)
HEADERS = ("cpu_blocks.h",)  # in the cache key with the sources
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def _cause(stderr: str) -> str:
    """The compiler's first error, with the linker's reason where it gave one (`cannot find
    -lgomp` comes before `collect2: error: ld returned 1 exit status`)."""
    lines = [line.strip() for line in stderr.splitlines()]
    reasons = [line for line in lines if "cannot find" in line or "undefined reference" in line]
    errors = [line for line in lines if "error" in line]
    return "; ".join((reasons[:1] + errors[:1]) or lines[-1:] or ["no output"])


class BuildError(RuntimeError):
    """The C kernels cannot be built here; the message names the cause and the fix."""


def compiler() -> list[str] | None:
    """The compiler's command: $CC (which may carry arguments: `ccache gcc`), else cc or gcc on
    the PATH; None where none is found."""
    words = shlex.split(os.environ.get("CC", ""))
    if words:
        found = shutil.which(words[0])
        return [found, *words[1:]] if found else None
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's instruction-set lines (Linux: `flags` on x86,
    `Features` and the part numbers on ARM), else the processor's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keys = ("flags", "Features", "CPU implementer", "CPU part")
    features = sorted({line for line in lines if line.startswith(keys)})
    return "\n".join(features) or platform.processor() or platform.machine()


def _run(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    except subprocess.TimeoutExpired as err:
        raise BuildError(f"{' '.join(command[:1])} took over 300 s") from err


def library() -> ctypes.CDLL:
    """The built kernels, loaded (built first where the cache lacks them). Raises BuildError."""
    built = _build_or_reason()
    if isinstance(built, str):
        raise BuildError(built)
    return built


def build_problem() -> str | None:
    """Why the kernels cannot be built and loaded here, or None where they can."""
    built = _build_or_reason()
    return built if isinstance(built, str) else None


@functools.cache  # once per process, a failure included: every rank's op calls ask
def _build_or_reason() -> ctypes.CDLL | str:
    try:
        return _load()
    except (BuildError, OSError) as err:
        return str(err)


def _load() -> ctypes.CDLL:
    cc = compiler()
    if cc is None:
        named = (
            f"CC={os.environ['CC']!r} is not on the PATH"
            if os.environ.get("CC")
            else "neither cc nor gcc is on the PATH"
        )
        raise BuildError(f"no C compiler found ({named}; set CC, or install gcc)")
    version = _run([*cc, "--version"]).stdout
    here = Path(__file__).parent
    sources = [here / name for name in SOURCES]
    texts = [path.read_text() for path in (*sources, *(here / name for name in HEADERS))]
    key = hashlib.sha256()
    # the command with its arguments (CC="gcc -fsanitize=address" builds another library)
    for part in (" ".join(cc), version, " ".join(FLAGS), _cpu_features(), *texts):
        key.update(part.encode())
    target = machine_cache_dir() / "kernels" / f"cpu_kernels_{key.hexdigest()[:16]}.so"
    if not target.exists():
        _compile(cc, sources, target)
    return ctypes.CDLL(str(target))


def _compile(cc: list[str], sources: list[Path], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        built = _run([*cc, *FLAGS, *map(str, sources), "-o", partial, "-lm"])
        if built.returncode != 0:
            raise BuildError(f"{cc[0]} failed on {', '.join(SOURCES)}: {_cause(built.stderr)}")
        os.chmod(partial, 0o755)  # mkstemp makes 0600; the machine's cache is shared
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
