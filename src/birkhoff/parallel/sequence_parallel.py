"""Sequence parallelism (Megatron-LM's, arXiv 2205.05198) on top of tensor parallelism.

Between the tensor-parallel sublayers a block's residual (B, T, n, C) is split along T over the
tp ranks, so the per-token work (RMSNorm, the mHC mappings, Sinkhorn and stream mixing, the
router, routed experts) and its activations are divided by tp instead of repeated. Around each
sublayer one all-gather (before the column-parallel layers) and one reduce-scatter (after the
row-parallel one) replace tensor parallelism's all-reduce, so the traffic is the same.

Where the split begins and ends: each model part's first block takes the whole residual and
keeps its slice (backward: all-gather), its last block gathers the slices again (backward:
keeps the slice of the identical gradients). Pipeline stages therefore pass whole sequences,
and the readout, head, loss and MTP depths run on the whole sequence as under plain tensor
parallelism. Engram's causal convolution reads up to (kernel - 1) x max_ngram earlier
positions, so Engram gathers the sequence and runs whole, like the head. So does V4 attention
(its KV entry and compressors are shared by every query head; its heads are split by tp).

The parameters that stay whole across tp (norms, mHC, router, routed experts) see only this
rank's positions, so their gradients are partial: `SequenceParallelGradients` sums them over
tp once a step's backward is complete (Megatron's approach; DTensor's SequenceParallel style
would need every mHC and MoE kernel to take DTensors).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle

from birkhoff.model.engram import Engram
from birkhoff.model.group_sums import summed_over
from birkhoff.model.moe import MoE
from birkhoff.model.v4_attention import V4Attention
from birkhoff.parallel.distributed import DistributedContext

SEQUENCE_DIM = 1  # of (B, T, ...) activations
# Gradients this big (16 KiB in float32) are all-reduced where they are; smaller ones (norms,
# mHC biases) are packed into one buffer so that they cost one collective.
IN_PLACE_NUMEL = 1 << 12


def split_sequence(x: torch.Tensor, mesh: DeviceMesh, dim: int) -> torch.Tensor:
    """This rank's slice of an `x` that is identical on every rank (backward: all-gather)."""
    whole = DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
    return whole.redistribute(mesh, (Shard(dim),)).to_local()


def gather_sequence(
    x: torch.Tensor, mesh: DeviceMesh, dim: int, local: bool = True
) -> torch.Tensor:
    """The whole of a tensor split along `dim` (backward: this rank's slice of the gradient,
    which is identical on every rank because what follows is computed identically). With
    `local=False`, a replicated DTensor for column-parallel layers to take as is."""
    whole = DTensor.from_local(x, mesh, (Shard(dim),), run_check=False).redistribute(
        mesh, (Replicate(),)
    )
    return whole.to_local() if local else whole


def _first(values, transform):
    """`values` (a tensor, or a tuple whose first element is the tensor) with it transformed."""
    if isinstance(values, tuple):
        return (transform(values[0]), *values[1:])
    return transform(values)


class SequenceLayout(ParallelStyle):
    """Turns a module's first input (`on="input"`) or output (`on="output"`, the first element
    of a tuple) from a slice along `dim` into the whole (`to="whole"`) or back (`to="slice"`).
    A whole input stays a replicated DTensor when `local` is False: the column-parallel layers
    inside take it as is."""

    def __init__(self, on: str, to: str, dim: int = SEQUENCE_DIM, local: bool = True) -> None:
        self.on, self.to, self.dim, self.local = on, to, dim, local

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def change(x: torch.Tensor):
            if self.to == "whole":
                return gather_sequence(x, mesh, self.dim, self.local)
            return split_sequence(x, mesh, self.dim)

        if self.on == "input":
            module.register_forward_pre_hook(lambda _, args: _first(args, change))
        else:
            module.register_forward_hook(lambda _, args, out: _first(out, change))
        return module


class WholeSequence(ParallelStyle):
    """The module runs on the whole sequence: its first input is gathered, its output split."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        SequenceLayout("input", "whole")._apply(module, mesh)
        return SequenceLayout("output", "slice")._apply(module, mesh)


def split_sequences_in_moe(block: nn.Module, tp_mesh: DeviceMesh) -> None:
    """MoE sequence balance losses sum their per-sequence statistics over the tp ranks; hash
    layers route the tokens of this rank's part of the sequence."""
    group = tp_mesh.get_group()
    for module in block.modules():
        if isinstance(module, MoE):
            module.sequence_sum = lambda statistics: summed_over(statistics, group)
            module.sequence_parts = tp_mesh.size()
            module.sequence_index = tp_mesh.get_local_rank()


def mark_sequence_bounds(blocks: list[nn.Module], tp_mesh: DeviceMesh) -> None:
    """The first of `blocks` splits the residual, the last gathers it."""
    SequenceLayout("input", "slice")._apply(blocks[0], tp_mesh)
    SequenceLayout("output", "whole")._apply(blocks[-1], tp_mesh)


class SequenceParallelGradients:
    """Sums over tp the gradients of the parameters that ran on a slice of the sequence:
    everything in the given blocks that tensor parallelism left whole, except Engram and V4
    attention (which run on the whole sequence). Call once a step's backward is complete
    (before clipping)."""

    def __init__(self, blocks: list[nn.Module], ctx: DistributedContext) -> None:
        self.group = ctx.group("tp")
        # (module, name) rather than the parameters: FSDP and expert parallelism, applied
        # later, replace them with sharded ones.
        self.slots = [slot for block in blocks for slot in sequence_local_slots(block)]

    @torch.no_grad()
    def __call__(self, *_) -> None:
        small: dict[torch.dtype, list[torch.Tensor]] = {}
        pending = []
        for module, name in self.slots:
            grad = getattr(module, name).grad
            if grad is None:
                continue
            grad = grad.to_local() if isinstance(grad, DTensor) else grad
            if grad.numel() >= IN_PLACE_NUMEL:
                pending.append(dist.all_reduce(grad, group=self.group, async_op=True))
            else:
                small.setdefault(grad.dtype, []).append(grad)
        for grads in small.values():  # one all-reduce per dtype
            flat = torch.cat([grad.reshape(-1) for grad in grads])
            dist.all_reduce(flat, group=self.group)
            parts = flat.split([grad.numel() for grad in grads])
            torch._foreach_copy_(grads, [p.view_as(g) for p, g in zip(parts, grads, strict=True)])
        for work in pending:
            work.wait()


def sequence_local_slots(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of what `block` holds whole over tp, except what runs on the
    whole sequence: Engram, and V4 attention (its KV path and compressors; their gradients are
    complete on every rank) (call after tensor parallelism, before anything else turns
    parameters into DTensors)."""
    whole = (Engram, V4Attention)
    on_whole = {id(m) for w in block.modules() if isinstance(w, whole) for m in w.modules()}
    return [
        (module, name)
        for module in block.modules()
        if id(module) not in on_whole
        for name, param in module.named_parameters(recurse=False)
        if not isinstance(param, DTensor)
    ]
