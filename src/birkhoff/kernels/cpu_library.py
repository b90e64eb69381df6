"""The `cpu` backend's C library as Python sees it: each C function's signature (kernels/cpu_*.c,
built by kernels/cpu_build.py), the call that hands it tensors as pointers, and the checks of
what every kernel assumes of its tensors (the ops built on them are public as
torch.ops.birkhoff.cpu_*, so they check before they call)."""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from birkhoff.kernels.cpu_build import library

# The kernels compute in float32 and the ops return each input's dtype: float32 streams
# (autocast keeps the residual in float32) and bf16/fp16 ones (FSDP's param_dtype); float64
# runs the reference, which keeps its precision.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_INT64, _INT, _FLOAT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
# The C functions: pointers, then sizes and options; those returning int return a status
# (-1: a thread's scratch or sum could not be allocated)
# the reads' (tokens, n, width, norm_eps, iters, pre_eps, form_eps, threads)
_READ_FORWARD_SIZES = (_INT64, _INT64, _INT64, _FLOAT, _INT, _FLOAT, _FLOAT, _INT)
_SIGNATURES = {
    "stream_read_forward": (3, (_INT64, _INT64, _INT64, _INT), None),
    "stream_read_backward": (5, (_INT64, _INT64, _INT64, _INT), None),
    "stream_merge_forward": (5, (_INT64, _INT64, _INT64, _INT), None),
    "stream_merge_backward": (9, (_INT64, _INT64, _INT64, _INT), None),
    "sinkhorn_forward": (2, (_INT64, _INT64, _INT, _FLOAT, _INT), _INT),
    "sinkhorn_backward": (3, (_INT64, _INT64, _INT, _FLOAT, _INT), _INT),
    "mhc_tail_forward": (6, (_INT64, _INT64, _INT, _FLOAT, _FLOAT, _INT), _INT),
    "mhc_tail_backward": (7, (_INT64, _INT64, _INT, _FLOAT, _INT), _INT),
    "mhc_read_forward": (10, _READ_FORWARD_SIZES, _INT),
    "mhc_read_backward": (17, (_INT64, _INT64, _INT64, _INT, _FLOAT, _FLOAT, _INT), _INT),
    "mhc_merge_read_forward": (14, _READ_FORWARD_SIZES, _INT),
    "mhc_merge_read_backward": (24, (_INT64, _INT64, _INT64, _INT, _FLOAT, _FLOAT, _INT), _INT),
    "rms_norm_forward": (4, (_INT64, _INT64, _FLOAT, _INT), None),
    "rms_norm_backward": (6, (_INT64, _INT64, _INT), _INT),
    "swiglu_forward": (3, (_INT64, _FLOAT, _INT, _INT), None),
    "swiglu_backward": (5, (_INT64, _FLOAT, _INT, _INT), None),
    # (rows, groups, width, pairs, inverse, threads)
    "rope_trailing": (4, (_INT64,) * 4 + (_INT, _INT), None),
    "engram_merge_forward": (7, (_INT64,) * 6 + (_FLOAT, _INT), None),
    "engram_merge_backward": (13, (_INT64,) * 6 + (_INT,), _INT),
    # (batch, seq, entries, width, dim, ratio, threads)
    "kv_compress_forward": (7, (_INT64,) * 6 + (_INT,), _INT),
    "kv_compress_backward": (11, (_INT64,) * 6 + (_INT,), _INT),
    # (batch, seq, heads, dim, entries, picks, window, threads)
    "v4_attention_forward": (8, (_INT64,) * 7 + (_INT,), _INT),
    "v4_attention_backward": (13, (_INT64,) * 7 + (_INT,), _INT),
}


@functools.cache
def kernels() -> ctypes.CDLL:
    lib = library()
    for name, (pointers, rest, returns) in _SIGNATURES.items():
        getattr(lib, name).argtypes = [_PTR] * pointers + list(rest)
        getattr(lib, name).restype = returns
    return lib


def call(name: str, *args) -> None:
    """`name` with tensors as pointers (None: NULL) and the thread count last."""
    pointers = [a.data_ptr() if isinstance(a, Tensor) else a for a in args]
    if getattr(kernels(), name)(*pointers, torch.get_num_threads()) == -1:
        raise MemoryError(f"the cpu kernel {name} could not allocate its scratch")


def float32_contiguous(tensor: Tensor) -> Tensor:
    return tensor.to(torch.float32).contiguous()


def check_inputs(*tensors: Tensor | None) -> None:
    """What the C kernels assume of every tensor they are handed (the ops are public:
    torch.ops.birkhoff.cpu_*): float32, contiguous, in CPU memory."""
    for tensor in tensors:
        if tensor is not None:
            torch._check(
                tensor.dtype == torch.float32 and tensor.is_contiguous()
                and tensor.device.type == "cpu",
                lambda t=tensor: f"the cpu kernels take contiguous float32 CPU tensors, got "
                f"{t.dtype} on {t.device}, contiguous={t.is_contiguous()}",
            )  # fmt: skip


def check_shapes(*pairs: tuple[Tensor | None, tuple[int, ...]]) -> None:
    """Each tensor (None: absent) of the shape the kernel indexes it by."""
    for tensor, shape in pairs:
        if tensor is not None:
            torch._check(
                tuple(tensor.shape) == tuple(shape),
                lambda t=tensor, shape=shape: (
                    f"the cpu kernel expected shape {tuple(shape)}, got {tuple(t.shape)}"
                ),
            )


def check_iters(iters: int) -> None:
    torch._check(iters >= 1, lambda: f"Sinkhorn needs at least 1 iteration, got {iters}")
