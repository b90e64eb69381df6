"""Builds the `cpu` backend's C kernels (kernels/cpu_*.c) into a shared library once per source,
compiler and CPU, and loads it with ctypes: the same route inductor's CPU code takes (the
system's C compiler, OpenMP), with no torch headers, so a build takes about a second.

The library is cached in the machine's cache (`kernels/` under $BIRKHOFF_CACHE_DIR, default
~/.cache/birkhoff), named by a hash of the source, the compiler's version, the flags and the
CPU's instruction sets (-march=native), and written under a temporary name and renamed: ranks
that build at once each finish with a whole file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from birkhoff.machine_cache import machine_cache_dir

SOURCES = ("cpu_mhc.c",)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


class BuildError(RuntimeError):
    """The C kernels cannot be built here; the message names the cause and the fix."""


def compiler() -> str | None:
    """$CC, else cc or gcc on the PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's flags line (Linux), else the processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False)


def library() -> ctypes.CDLL:
    """The built kernels, loaded (built first where the cache lacks them). Raises BuildError."""
    built = _build()
    if isinstance(built, str):
        raise BuildError(built)
    return built


def build_problem() -> str | None:
    """Why the kernels cannot be built and loaded here, or None where they can."""
    built = _build()
    return built if isinstance(built, str) else None


@functools.cache  # once per process, a failure included: every rank's op calls ask
def _build() -> ctypes.CDLL | str:
    try:
        return _load()
    except (BuildError, OSError) as err:
        return str(err)


def _load() -> ctypes.CDLL:
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler found (set CC, or install gcc)")
    version = _run([cc, "--version"]).stdout
    sources = [Path(__file__).parent / name for name in SOURCES]
    key = hashlib.sha256()
    for part in (version, " ".join(FLAGS), _cpu_features(), *(s.read_text() for s in sources)):
        key.update(part.encode())
    target = machine_cache_dir() / "kernels" / f"cpu_kernels_{key.hexdigest()[:16]}.so"
    if not target.exists():
        _compile(cc, sources, target)
    return ctypes.CDLL(str(target))


def _compile(cc: str, sources: list[Path], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        built = _run([cc, *FLAGS, *map(str, sources), "-o", partial, "-lm"])
        if built.returncode != 0:
            errors = [line for line in built.stderr.splitlines() if "error" in line]
            raise BuildError(f"{cc} failed on {', '.join(SOURCES)}: {(errors or ['?'])[0]}")
        os.chmod(partial, 0o755)  # mkstemp makes 0600; the machine's cache is shared
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
