"""The `cpu` backend's C library as Python sees it: each C function's signature (kernels/cpu_*.c,
built by kernels/cpu_build.py), the call that hands it tensors as pointers, the checks of
what every kernel assumes of its tensors (the ops built on them are public as
torch.ops.birkhoff.cpu_*, so they check before they call), and the two ways each op runs:
as a torch custom op (torch.ops, opcheck, and compiled code: dynamo traces the call and its
registered fake, inductor's code calls the op and its backward op) and, in eager code, as an
autograd Function calling the same Python bodies.

Why two: at small shapes a kernel takes a few µs, and torch.library's dispatch of a custom op
with autograd and of its backward op about 110 µs a forward and backward pair on this
project's 2-core CPU (the Function's own machinery about 45 µs); a `tiny` step runs 76 such
pairs. The bodies are the same functions either way, so the two paths compute alike.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.library import CustomOpDef, custom_op

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
    # (rows, groups, width, pairs, inverse, eps, threads); backward without eps
    "rope_trailing_normed_forward": (5, (_INT64,) * 4 + (_INT, _FLOAT, _INT), None),
    "rope_trailing_normed_backward": (6, (_INT64,) * 4 + (_INT, _INT), None),
    "engram_merge_forward": (7, (_INT64,) * 6 + (_FLOAT, _INT), None),
    "engram_merge_backward": (13, (_INT64,) * 6 + (_INT,), _INT),
    # (batch, seq, entries, width, dim, ratio, threads)
    "kv_compress_forward": (7, (_INT64,) * 6 + (_INT,), _INT),
    "kv_compress_backward": (11, (_INT64,) * 6 + (_INT,), _INT),
    # (batch, seq, heads, dim, entries, picks, window, threads)
    "v4_attention_forward": (8, (_INT64,) * 7 + (_INT,), _INT),
    "v4_attention_backward": (13, (_INT64,) * 7 + (_INT,), _INT),
    # (count, divisor, width, threads); (count, rows, width, threads)
    "gather_rows": (3, (_INT64,) * 3 + (_INT,), None),
    "scatter_add_rows": (3, (_INT64,) * 3 + (_INT,), None),
    # (tokens, k, width, threads)
    "moe_weighted_sum": (4, (_INT64,) * 3 + (_INT,), None),
    "moe_unpermute_backward": (6, (_INT64,) * 3 + (_INT,), None),
    # (rows, vocab, count, want_grad, threads)
    "cross_entropy_rows": (3, (_INT64,) * 3 + (_INT, _INT), None),
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


def check(condition: bool, message: Callable[[], str]) -> None:
    """A RuntimeError with the message where the condition fails. Plain Python, not
    torch._check (several µs a call): the bodies run on real tensors only (fake tensors take
    the registered fakes), whose shapes are plain ints."""
    if not condition:
        raise RuntimeError(message())


def check_inputs(*tensors: Tensor | None) -> None:
    """What the C kernels assume of every tensor they are handed (the ops are public:
    torch.ops.birkhoff.cpu_*): float32, contiguous, in CPU memory."""
    for t in tensors:
        if t is not None and not (t.dtype == torch.float32 and t.is_contiguous() and t.is_cpu):
            raise RuntimeError(
                f"the cpu kernels take contiguous float32 CPU tensors, got {t.dtype} on "
                f"{t.device}, contiguous={t.is_contiguous()}"
            )


def check_shapes(*pairs: tuple[Tensor | None, tuple[int, ...]]) -> None:
    """Each tensor (None: absent) of the shape the kernel indexes it by."""
    for tensor, shape in pairs:
        if tensor is not None and tensor.shape != tuple(shape):
            raise RuntimeError(
                f"the cpu kernel expected shape {tuple(shape)}, got {tuple(tensor.shape)}"
            )


def check_iters(iters: int) -> None:
    check(iters >= 1, lambda: f"Sinkhorn needs at least 1 iteration, got {iters}")


def kernel_op(
    name: str, mutates_args: tuple[str, ...] = ()
) -> Callable[[Callable[..., object]], CustomOpDef]:
    """Registers the decorated body as the custom op `birkhoff::{name}` (writing the inputs
    named in `mutates_args`) and keeps the body as the op's `body`, for eager code to call
    without torch.library's dispatch."""

    def register_body(body: Callable[..., object]) -> CustomOpDef:
        op = custom_op(f"birkhoff::{name}", body, mutates_args=mutates_args)
        op.body = body
        return op

    return register_body


def autograd_paths(
    name: str,
    op: CustomOpDef,
    setup_context: Callable,
    grads: Callable[[Callable], Callable],
    backward_op: CustomOpDef,
) -> Callable[..., object]:
    """Gives `op` its autograd both ways: registered on the custom op (`grads(backward_op)`,
    `setup_context`), and as an autograd Function named `name` running `op`'s body with
    `grads(backward_op.body)`; returns what the backend's ops call: the custom op while
    torch.compile traces (dynamo cannot trace a ctypes call), the Function's `apply`
    otherwise. The backward is once differentiable, as the custom op's (its backward op has
    no autograd).
    setup_context is called from the forward, not given to the Function as its own method:
    with one, every `apply` binds its arguments to the forward's signature through
    `inspect` (tens of µs a call)."""
    op.register_autograd(grads(backward_op), setup_context=setup_context)
    body, backward = op.body, grads(backward_op.body)

    def forward(ctx, *inputs):
        output = body(*inputs)
        setup_context(ctx, inputs, output)
        return output

    function = type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(once_differentiable(backward))},
    )
    eager = function.apply

    def run(*inputs):
        return op(*inputs) if torch.compiler.is_compiling() else eager(*inputs)

    return run
