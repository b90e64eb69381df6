"""Initialisation that does not depend on the layout.

A model is built on the `meta` device, cut into pipeline stages and sharded there, and only then
given storage (`to_empty`); each rank then writes the values of the elements it holds. So that
every layout starts from the same full parameters as one process, a value is a function of the
seed, the tensor's name in the whole model and the element's global index alone:

- a random matrix is drawn Normal(0, std) in blocks of rows along dim 0, each block from its
  own generator seeded by (seed, name, block index); a rank draws the blocks its rows touch;
- a tensor with a fixed initial value (norm gains, hyper-connection biases, RoPE tables, hash
  tables, Engram's hash constants) is registered with `constant`, which keeps the function
  that makes its value on the CPU; a rank copies its part of that value.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

# Elements drawn per generator: small enough to stay cheap, large enough that few seeds run.
BLOCK_ELEMENTS = 1 << 20
# checkpoint_wrapper puts this into parameter names; a tensor's identity is its name without it.
WRAPPER_PREFIX = "_checkpoint_wrapped_module."

Maker = Callable[[], torch.Tensor]


def constant(
    module: nn.Module, name: str, make: Maker, buffer: bool = False, persistent: bool = True
) -> None:
    """Register `make()` as parameter (or buffer) `name` of `module`, remembering `make` so
    that a model built on `meta` gets the same value when it is materialised."""
    value = make()
    if buffer:
        module.register_buffer(name, value, persistent=persistent)
    else:
        module.register_parameter(name, nn.Parameter(value))
    makers = module.__dict__.setdefault("_constant_makers", {})
    makers[name] = make


def constant_makers(model: nn.Module) -> dict[str, Maker]:
    """Every tensor registered with `constant` in `model`, by its clean full name."""
    found = {}
    for prefix, module in model.named_modules():
        for name, make in module.__dict__.get("_constant_makers", {}).items():
            found[clean_name(f"{prefix}.{name}" if prefix else name)] = make
    return found


def clean_name(name: str) -> str:
    return name.replace(WRAPPER_PREFIX, "")


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(clean name, tensor, is_parameter) for every parameter and buffer, shared ones once."""
    for name, param in model.named_parameters():
        yield clean_name(name), param, True
    for name, buffer in model.named_buffers():
        yield clean_name(name), buffer, False


def local_part(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(the elements this rank holds, where they sit in the whole tensor)."""
    if not isinstance(tensor, DTensor):
        return tensor, tuple(slice(0, size) for size in tensor.shape)
    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    local = tensor.to_local()
    return local, tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


def assign_(tensor: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this rank's part of `whole` (the entire tensor, any device) into `tensor`."""
    local, region = local_part(tensor)
    if tuple(whole.shape) != tuple(tensor.shape):
        raise ValueError(f"a value of shape {tuple(whole.shape)} for {tuple(tensor.shape)}")
    local.copy_(whole[region])


def seeded_normal_(tensor: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill this rank's part of `tensor` with Normal(0, std), the same element values for any
    sharding (see the module docstring)."""
    local, region = local_part(tensor)
    if local.numel() == 0:
        return
    rows_total = tensor.shape[0] if tensor.dim() else 1
    row_shape = tuple(tensor.shape[1:])
    rows_per_block = max(1, BLOCK_ELEMENTS // max(1, math.prod(row_shape)))
    first = region[0].start if tensor.dim() else 0
    stop = region[0].stop if tensor.dim() else 1
    generator = torch.Generator(device=local.device)
    for block in range(first // rows_per_block, (stop - 1) // rows_per_block + 1):
        begin = block * rows_per_block
        end = min(rows_total, begin + rows_per_block)
        generator.manual_seed(_block_seed(seed, name, block))
        values = torch.empty((end - begin, *row_shape), device=local.device)
        values.normal_(0.0, std, generator=generator)
        lo, hi = max(begin, first), min(end, stop)  # the rows of this block held here
        held = values[(slice(lo - begin, hi - begin), *region[1:])]
        if tensor.dim():
            local[lo - first : hi - first].copy_(held)
        else:
            local.copy_(held.reshape(()))


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def initialise(model: nn.Module, seed: int, std_of: Callable[[str], float]) -> None:
    """Write the initial value of every tensor `model` holds (after `to_empty`): constants
    from their makers, every other parameter Normal(0, std_of(name)). A buffer without a maker
    is a bug in the model code, refused."""
    makers = constant_makers(model)
    for name, tensor, is_parameter in named_tensors(model):
        if name in makers:
            assign_(tensor, makers[name]().to(tensor.dtype))
        elif is_parameter:
            seeded_normal_(tensor, std_of(name), seed, name)
        else:
            raise RuntimeError(f"buffer {name} has no initial value: register it with constant()")
