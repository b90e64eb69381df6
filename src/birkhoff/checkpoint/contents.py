"""Reading a checkpoint's tensors outside training: their metadata, or whole tensors in one
process (DCP merges the shards every rank wrote)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from birkhoff.checkpoint.safe_metadata import load_checkpoint_tensors, load_metadata


def tensor_metadata(path: Path) -> dict[str, TensorStorageMetadata]:
    """Every tensor DCP saved in `path` (name -> size and dtype), read without loading."""
    metadata = load_metadata(path).state_dict_metadata  # unpickled by an allow-list
    return {k: v for k, v in metadata.items() if isinstance(v, TensorStorageMetadata)}


def read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint, whole, in this process."""
    metadata = tensor_metadata(path)
    state = {n: torch.empty(metadata[n].size, dtype=metadata[n].properties.dtype) for n in names}
    load_checkpoint_tensors(state, path, no_dist=True)
    return state


def stored_bytes(item: TensorStorageMetadata, dtype: torch.dtype | None = None) -> int:
    """Bytes of a saved tensor, whole; as `dtype` if given (floating-point tensors only)."""
    saved = item.properties.dtype
    cast = dtype is not None and saved.is_floating_point
    return math.prod(item.size) * (dtype.itemsize if cast else saved.itemsize)
