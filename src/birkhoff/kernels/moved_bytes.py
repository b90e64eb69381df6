"""Device-memory bytes that kernels move, counted on the CPU: what the planner's traffic model
(parallel/planning/traffic.py) is checked against, per kernel backend.

Every aten op that runs a kernel (launch_counter's rule: views and allocations run none) reads
its tensor arguments (but a destination it overwrites, `out` or copy_'s, and a tensor it takes
for its shape, zeros_like's) and writes its new outputs and the arguments it mutates. Matmuls
are left out (they are timed against the compute peak, not the bandwidth), in-place forms
included, except a batched product with a side of at most STREAM_SIDE (mHC's stream mixes,
n x n by n x C: about one FLOP a byte, memory-bound on every device; the plan's FLOPs hold no
such product); a Triton kernel's own products load their operands, and those loads count.
Under `triton()` every launch Triton's interpreter runs counts the distinct addresses its
loads read and its stores and atomics write (tensor descriptors load and store through the
same masked calls in the interpreter; Triton 3.9 has no block pointers), the masked-off lanes
not, each address once however many programs touch it: a kernel's compulsory traffic, as an
aten op's tensors count once (what a GPU reads twice from device memory because its cache
dropped it is not counted). The interpreter's own copies of the arguments count nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from birkhoff.kernels.launch_counter import NO_KERNEL

aten = torch.ops.aten
MATMULS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.baddbmm_,
           aten._grouped_mm, aten.linear}  # fmt: skip
BATCHED = {aten.bmm: (0, 1), aten.baddbmm: (1, 2), aten.baddbmm_: (1, 2)}  # the two factors
STREAM_SIDE = 8


def is_compute(func, args: tuple) -> bool:
    """A matmul timed at the compute peak: every matmul but a batched one with a side of at
    most STREAM_SIDE."""
    packet = func.overloadpacket
    if packet not in MATMULS:
        return False
    if packet not in BATCHED:
        return True
    left, right = (args[i] for i in BATCHED[packet])
    return min(*left.shape[1:], right.shape[-1]) > STREAM_SIDE


def tensor_bytes(values) -> int:
    """Bytes of the tensors among `values` (pytree containers)."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(values) if torch.is_tensor(t))


class MovedBytes(TorchDispatchMode):
    """Bytes the kernels outside the matmuls read and write while the mode is on; `by_name`
    splits them by op ("aten.mul", "triton._mhc_post_kernel")."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_name: Counter[str] = Counter()
        self._paused = 0
        self._launch: tuple[list, list] | None = None  # (reads, writes) of the running launch

    def _add(self, name: str, moved: int) -> None:
        self.total += moved
        self.by_name[name] += moved

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self._paused or is_compute(func, args) or name in NO_KERNEL:
            return out
        schema = func._schema
        given = [*args, *(kwargs.get(a.name) for a in schema.arguments[len(args) :])]
        pairs = list(zip(schema.arguments, given, strict=False))
        mutated = [v for a, v in pairs if a.alias_info is not None and a.alias_info.is_write]
        returns = out if isinstance(out, tuple) else (out,)
        new = [v for r, v in zip(schema.returns, returns, strict=False) if r.alias_info is None]
        if mutated or new:  # a view writes nothing and moves nothing
            read = [v for i, (a, v) in enumerate(pairs) if not _unread(name, i, a)]
            self._add(f"aten.{name}", tensor_bytes((read, mutated, new)))
        return out

    @contextmanager
    def triton(self) -> Iterator[None]:
        """Count the interpreted Triton launches' loads, stores and atomics (TRITON_INTERPRET=1
        must have been set before Triton was first imported)."""
        from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder

        run, load, store = (InterpretedFunction.run, InterpreterBuilder.create_masked_load,
                            InterpreterBuilder.create_masked_store)  # fmt: skip
        rmw, cas = InterpreterBuilder.create_atomic_rmw, InterpreterBuilder.create_atomic_cas

        def counted_run(kernel, *args, **kwargs):
            outer, self._launch = self._launch, ([], [])
            self._paused += 1
            try:
                return run(kernel, *args, **kwargs)
            finally:
                self._paused -= 1
                reads, writes = self._launch
                self._launch = outer
                self._add(f"triton.{kernel.fn.__name__}", _distinct(reads) + _distinct(writes))

        def note(ptrs, mask, *into: int) -> None:
            if self._launch is not None:
                addresses = np.broadcast_to(ptrs.data, np.shape(mask.data))[mask.data]
                size = ptrs.get_element_ty().primitive_bitwidth // 8
                for i in into:
                    self._launch[i].append((addresses, size))

        def counted_load(builder, ptrs, mask, *rest, **keywords):
            note(ptrs, mask, 0)
            return load(builder, ptrs, mask, *rest, **keywords)

        def counted_store(builder, ptrs, value, mask, *rest, **keywords):
            note(ptrs, mask, 1)
            return store(builder, ptrs, value, mask, *rest, **keywords)

        def counted_rmw(builder, op, ptrs, value, mask, *rest, **keywords):
            note(ptrs, mask, 0, 1)
            return rmw(builder, op, ptrs, value, mask, *rest, **keywords)

        def counted_cas(builder, ptrs, compare, value, *rest, **keywords):
            note(ptrs, _Everywhere(ptrs), 0, 1)
            return cas(builder, ptrs, compare, value, *rest, **keywords)

        patches = [(InterpretedFunction, "run", counted_run),
                   (InterpreterBuilder, "create_masked_load", counted_load),
                   (InterpreterBuilder, "create_masked_store", counted_store),
                   (InterpreterBuilder, "create_atomic_rmw", counted_rmw),
                   (InterpreterBuilder, "create_atomic_cas", counted_cas)]  # fmt: skip
        originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
        for owner, attr, patched in patches:
            setattr(owner, attr, patched)
        try:
            yield
        finally:
            for owner, attr, original in originals:
                setattr(owner, attr, original)


# ops that take their first argument for its shape or as a destination, not its values
WRITE_ONLY = {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
              "zero_", "fill_", "copy_"}  # fmt: skip


def _unread(name: str, position: int, argument) -> bool:
    """Whether an op leaves an argument's values unread: a destination it overwrites (`out`,
    copy_'s target) or a tensor it takes for its shape."""
    return (position == 0 and name in WRITE_ONLY) or argument.name == "out"


class _Everywhere:
    """A mask of every lane of `ptrs` (compare-and-swap takes none)."""

    def __init__(self, ptrs) -> None:
        self.data = np.ones(np.shape(ptrs.data), dtype=bool)


def _distinct(accesses: list[tuple[np.ndarray, int]]) -> int:
    """Bytes at the distinct addresses among `accesses` ((addresses, element bytes) each)."""
    if not accesses:
        return 0
    addresses = np.concatenate([a for a, _ in accesses])
    sizes = np.concatenate([np.full(a.shape, s, dtype=np.int64) for a, s in accesses])
    _, first = np.unique(addresses, return_index=True)
    return int(sizes[first].sum())
