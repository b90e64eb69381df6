"""Op registry: every hot op has a `reference` implementation (plain torch, runs anywhere);
a backend (`cpu`: C kernels built with the system's compiler, `triton` on CUDA, `npu` through
torch_npu) registers the ops it accelerates.

Which implementation runs is never hidden: `implementations(backend)` says it op by op, an op
a backend lacks runs the reference and is listed as a fallback (`describe` gives the line the
trainer prints at start, the run's summary and `birkhoff doctor` keep the table). An op a
backend implements only for some input dtypes (torch_npu's MoE token permutation: bfloat16)
runs the reference for the others; given the run's compute dtype, the table says which. An
op may also need something of the machine (torch_npu's mHC operators: a CANN that has them):
its backend's check says what is missing, and the table lists it as a fallback with that
reason; and it may take only some calls beyond their dtype (a note in the table says which).
The table is filled once at import by the backend modules and never changes afterwards, so it
is not run-time mutable state: which backend a model uses is an argument, not a global switch.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

from birkhoff.errors import require
from birkhoff.kernels import cpu_build

REFERENCE = "reference"
CPU = "cpu"
BACKENDS = (REFERENCE, CPU, "triton", "npu")
KERNEL_CHOICES = ("auto", *BACKENDS)
KEY = "backend.kernels"
PACKAGES = {"triton": "triton", "npu": "torch_npu"}  # what each backend needs to import
_OPS: dict[tuple[str, str], Callable[..., Any]] = {}
_DTYPES: dict[tuple[str, str], tuple[torch.dtype, ...]] = {}  # implementations limited to these
_NEEDS: dict[tuple[str, str], Callable[[], str | None]] = {}  # what is missing here, or None
_LIMITS: dict[tuple[str, str], str] = {}  # which calls beyond the dtype run the reference
# implementations whose first tensor is the residual streams: they see the parameters' dtype
# (float32, or FSDP's param_dtype), not autocast's
_ON_RESIDUAL: set[tuple[str, str]] = set()


def register(
    op: str,
    backend: str,
    dtypes: tuple[torch.dtype, ...] | None = None,
    needs: Callable[[], str | None] | None = None,
    limits: str | None = None,
    on_residual: bool = False,
    autocast: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding `fn` as the `backend` implementation of `op`; with `dtypes`, only for
    calls whose first tensor argument has one of them (the reference runs the others), which
    with `on_residual` is the residual streams (the table then takes the run's residual dtype)
    and with `autocast` a matmul's input, which counts in autocast's dtype where autocast casts
    it (matmul_dtype: `fn` casts it so); with `needs`, only where it returns None (else what
    this machine lacks: the reference runs); `limits` names the calls `fn` itself hands to the
    reference, for the table."""

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        key = (op, backend)
        if key in _OPS:
            raise ValueError(f"kernel {op!r} is already registered for backend {backend!r}")
        _OPS[key] = fn if dtypes is None else _for_dtypes(op, fn, dtypes, autocast)
        if dtypes is not None:
            _DTYPES[key] = dtypes
        if needs is not None:
            _NEEDS[key] = needs
        if limits is not None:
            _LIMITS[key] = limits
        if on_residual:
            _ON_RESIDUAL.add(key)
        return fn

    return add


def machine_lacks(op: str, backend: str) -> str | None:
    """What this machine lacks for `backend`'s own `op` (None: nothing, or no such check)."""
    _load_backends()
    needs = _NEEDS.get((op, backend))
    return None if needs is None else needs()


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul computes `t` in: autocast's where autocast is on for its device
    and would cast it (float32), else its own."""
    device = t.device.type
    if t.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


def _for_dtypes(
    op: str, fn: Callable[..., Any], dtypes: tuple[torch.dtype, ...], autocast: bool
) -> Callable[..., Any]:
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        first = next(a for a in args if isinstance(a, torch.Tensor))
        seen = matmul_dtype(first) if autocast else first.dtype
        return (fn if seen in dtypes else _OPS[(op, REFERENCE)])(*args, **kwargs)

    dispatch.__doc__ = fn.__doc__
    return dispatch


def dtypes_of(op: str, backend: str) -> tuple[torch.dtype, ...] | None:
    """The input dtypes `backend`'s own `op` is limited to (None: every dtype)."""
    _load_backends()
    return _DTYPES.get((op, backend))


def get(op: str, backend: str = REFERENCE) -> Callable[..., Any]:
    """The implementation of `op` that `backend` runs: its own, or the reference one where it
    has none (a fallback, listed by `implementations` and `describe`)."""
    _load_backends()
    if backend not in BACKENDS:  # `auto` is resolved per device first (backend_for)
        raise ValueError(f"kernel backend {backend!r}: not one of {', '.join(BACKENDS)}")
    if (op, backend) in _OPS and machine_lacks(op, backend) is None:
        return _OPS[(op, backend)]
    if (op, REFERENCE) in _OPS:
        return _OPS[(op, REFERENCE)]
    raise KeyError(f"unknown kernel {op!r}; known kernels: {', '.join(ops())}")


def ops() -> list[str]:
    """Every op with a reference implementation."""
    _load_backends()
    return sorted(name for name, backend in _OPS if backend == REFERENCE)


def implementations(
    backend: str, dtype: torch.dtype | None = None, residual_dtype: torch.dtype | None = None
) -> dict[str, str]:
    """Per op, the backend whose implementation runs when `backend` is asked for, for inputs
    of `dtype` (the run's compute dtype; None: any dtype an op's implementation accepts) and,
    for ops on the residual streams, of `residual_dtype` (None: `dtype`)."""
    _load_backends()

    def runs(op: str) -> bool:
        key = (op, backend)
        if key not in _OPS or machine_lacks(op, backend) is not None:
            return False
        seen = residual_dtype if key in _ON_RESIDUAL and residual_dtype is not None else dtype
        return key not in _DTYPES or seen is None or seen in _DTYPES[key]

    return {op: backend if runs(op) else REFERENCE for op in ops()}


def fallbacks(
    backend: str, dtype: torch.dtype | None = None, residual_dtype: torch.dtype | None = None
) -> list[str]:
    """The ops `backend` runs with the reference implementation (for inputs of `dtype`, the
    residual streams of `residual_dtype`)."""
    if backend == REFERENCE:
        return []
    table = implementations(backend, dtype, residual_dtype)
    return [op for op, impl in table.items() if impl == REFERENCE]


def describe(
    backend: str, dtype: torch.dtype | None = None, residual_dtype: torch.dtype | None = None
) -> str:
    """One line: the backend, the ops it runs itself, and the reference fallbacks (for
    inputs of `dtype`, residual streams of `residual_dtype`); an op limited to some dtypes
    says which (and that it sees the residual streams')."""
    table = implementations(backend, dtype, residual_dtype)
    if backend == REFERENCE:
        return f"kernels: reference (plain torch) for all {len(table)} ops"

    def named(op: str) -> str:
        key = (op, backend)
        said = []
        if key in _DTYPES:
            kinds = " or ".join(str(d).removeprefix("torch.") for d in _DTYPES[key])
            kinds += " residual streams" if key in _ON_RESIDUAL else ""
            said.append(f"{kinds} only")
        lacking = machine_lacks(op, backend) if key in _OPS else None
        if lacking:
            said.append(f"not here: {lacking}")
        elif key in _LIMITS:
            said.append(_LIMITS[key])
        return f"{op} ({'; '.join(said)})" if said else op

    own = [named(op) for op, impl in table.items() if impl == backend]
    missing = [named(op) for op in fallbacks(backend, dtype, residual_dtype)]
    return (
        f"kernels: {backend} for {len(own)} of {len(table)} ops ({', '.join(own) or 'none'}); "
        f"{len(missing)} fall back to reference: {', '.join(missing) or 'none'}"
    )


def available_backends() -> list[str]:
    """Backends whose package imports on this machine (reference always; cpu where a C
    compiler is found: whether its kernels build is known once `backend_for` has built them)."""
    importable = [b for b, package in PACKAGES.items() if _importable(package)]
    return sorted([REFERENCE, *importable, *([CPU] if cpu_build.compiler() else [])])


def _importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # in sys.modules without a spec (a stand-in module)
        return True


def triton_runs_on(device_type: str) -> bool:
    """Triton compiles for CUDA; on the CPU only its interpreter runs it (TRITON_INTERPRET=1,
    the tests' mode)."""
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def backend_for(requested: str, device_type: str | None) -> str:
    """The backend a rank on `device_type` runs for `backend.kernels=requested`: `auto` takes
    the device's own (cpu on a CPU where its kernels build, triton on CUDA where it imports,
    npu on Ascend), else the reference (`auto_note` says why, on a CPU);
    an explicit backend that cannot run here is a RecipeError naming the fix (with
    `device_type` None, before the device is known, only whether its package imports)."""
    available = available_backends()
    if requested == "auto":
        if device_type == "cuda" and "triton" in available:
            return "triton"
        if device_type == "cpu" and cpu_build.build_problem() is None:
            return CPU
        return "npu" if device_type == "npu" and "npu" in available else REFERENCE
    if requested == CPU:
        require(
            device_type in (None, "cpu"),
            KEY,
            requested,
            f"runs on the CPU (this rank runs on {device_type}); use auto",
        )
        problem = cpu_build.build_problem()
        require(problem is None, KEY, requested, f"{problem}; use auto or reference")
        return requested
    package = {"triton": "birkhoff[cuda] (triton)", "npu": "birkhoff[npu] (torch_npu, CANN)"}
    require(
        requested in available,
        KEY,
        requested,
        f"its package does not import here; install {package.get(requested, requested)}, "
        "or use auto",
    )
    if device_type is None:
        return requested
    require(
        requested != "triton" or triton_runs_on(device_type),
        KEY,
        requested,
        f"needs a CUDA device (this rank runs on {device_type}); use auto, or set "
        "TRITON_INTERPRET=1 to interpret the kernels on the CPU",
    )
    require(
        requested != "npu" or device_type == "npu",
        KEY,
        requested,
        f"needs an Ascend device (this rank runs on {device_type}); use auto",
    )
    return requested


def auto_note(requested: str, device_type: str) -> str | None:
    """Why `auto` runs the reference on a CPU (its C kernels did not build), else None."""
    if requested != "auto" or device_type != "cpu":
        return None
    problem = cpu_build.build_problem()
    return None if problem is None else f"the cpu kernels did not build ({problem})"


def _load_backends() -> None:
    # Importing a backend module registers its ops; importing twice is a no-op. A backend
    # whose package does not import is registered (its table can be shown) but not available.
    from birkhoff.kernels import (  # noqa: F401  (npu_ops: torch_npu lazily; cpu_*: built lazily)
        cpu_cross_entropy,
        cpu_engram,
        cpu_kv_compress,
        cpu_mhc,
        cpu_mhc_merge_read,
        cpu_mhc_read,
        cpu_moe,
        cpu_rows,
        cpu_v4_attention,
        indexer_loss,
        linear_cross_entropy,
        moe_route,
        npu_cross_entropy,
        npu_indexer_loss,
        npu_mhc,
        npu_ops,
        npu_router,
        npu_v4_attention,
        reference,
    )

    if _importable("triton"):  # the kernels compile at import
        from birkhoff.kernels import (  # noqa: F401
            flex_v4_attention,
            triton_engram,
            triton_engram_merge,
            triton_entry_mass,
            triton_kv_compress,
            triton_mhc,
            triton_mhc_mapping,
            triton_mhc_read,
            triton_moe,
            triton_moe_route,
            triton_rope,
            triton_sinkhorn,
            triton_swiglu,
        )

        if _importable("liger_kernel"):  # imported on first use (its import takes seconds)
            from birkhoff.kernels import liger_ops  # noqa: F401
