"""Opening a checkpoint received from someone else without running its code.

DCP keeps a checkpoint's metadata (tensor names, sizes, dtypes, where each shard lies) in
`.metadata`, a pickle, and unpickles it with plain `pickle`, which calls whatever function the
file names. Here it is unpickled by an allow-list: the DCP classes a checkpoint of tensors
references (found by unpickling real ones), torch dtypes and sizes, and plain containers;
anything else is refused before it is looked up. Every DCP read of a checkpoint goes through
`SafeFileSystemReader` (via `load_checkpoint_tensors`), which uses it.

The shards (`*.distcp`) are read by DCP with `torch.load(weights_only=True)`, itself an
allow-list; but DCP's planner loads a value the metadata declares as bytes with
`torch.load(weights_only=False)`. Birkhoff saves tensors only, so such metadata is refused
(BytesStorageMetadata is not allowed) and the planner used here refuses bytes as well.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from birkhoff.checkpoint.errors import CheckpointError

METADATA = ".metadata"

_DCP = "torch.distributed.checkpoint"
ALLOWED = frozenset(
    {
        (f"{_DCP}.metadata", "Metadata"),
        (f"{_DCP}.metadata", "StorageMeta"),
        (f"{_DCP}.metadata", "MetadataIndex"),
        (f"{_DCP}.metadata", "TensorStorageMetadata"),
        (f"{_DCP}.metadata", "TensorProperties"),
        (f"{_DCP}.metadata", "ChunkStorageMetadata"),
        (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),  # an Enum: called with its value
        (f"{_DCP}.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # looks a torch.layout up by its name
        # StorageMeta.checkpoint_id: the path the checkpoint was saved under.
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib._local", "PosixPath"),  # where Python 3.13 defines it
        ("collections", "OrderedDict"),
        *(
            ("builtins", name)
            for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str")
        ),
        *(("builtins", name) for name in ("bytes", "bytearray", "bool", "complex")),
    }
)
# torch dtypes pickle as a reference to their name in the torch module.
TORCH_DTYPES = frozenset(
    name for name, dtype in vars(torch).items() if isinstance(dtype, torch.dtype)
)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, handle: BinaryIO, source: Path) -> None:
        super().__init__(handle)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED or (module == "torch" and name in TORCH_DTYPES):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.source}: refuses to load {module}.{name} (only checkpoint metadata classes "
            "are allowed); this checkpoint is not safe to open"
        )


def load_metadata(path: Path) -> Metadata:
    """DCP's metadata of the checkpoint directory `path`, unpickled by the allow-list and
    checked to describe tensors only, stored in files of the checkpoint itself."""
    file = Path(path) / METADATA
    try:
        with file.open("rb") as handle:
            metadata = _MetadataUnpickler(handle, file).load()
    except FileNotFoundError:
        raise CheckpointError(
            f"{file} is missing: {path} is not a checkpoint, or an incomplete copy of one"
        ) from None
    except CheckpointError:
        raise
    except Exception as err:  # a truncated or garbled pickle fails in many ways
        reason = (str(err).splitlines() or [""])[0]
        raise CheckpointError(f"{file} is unreadable ({type(err).__name__}: {reason})") from err
    _check(metadata, file)
    return metadata


def _check(metadata: Any, file: Path) -> None:
    """What DCP would do with the unpickled objects stays within the checkpoint: tensors only,
    read from plain files beside `.metadata`, with no stream transforms (birkhoff uses none)."""

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{file}: {what}; this checkpoint is not safe to open")

    if not isinstance(metadata, Metadata):
        raise refuse(f"holds a {type(metadata).__name__}, not checkpoint metadata")
    if not isinstance(metadata.state_dict_metadata, dict):
        raise refuse("its tensor list is not a dict")
    for name, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise refuse(f"{name!r} is not a tensor ({type(item).__name__})")
    if not isinstance(metadata.storage_data, dict):
        raise refuse("its shard list is not a dict")
    for info in metadata.storage_data.values():
        if not isinstance(info, _StorageInfo):
            raise refuse(f"a shard entry is a {type(info).__name__}")
        name = info.relative_path
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise refuse(f"a shard is read from {name!r}, outside the checkpoint directory")
        if info.transform_descriptors:
            raise refuse(f"{name} is read through transforms {info.transform_descriptors}")
    if metadata.storage_meta is not None and not isinstance(metadata.storage_meta, StorageMeta):
        raise refuse(f"its storage_meta is a {type(metadata.storage_meta).__name__}")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read by `load_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            # DCP's fallback to per-rank metadata files: birkhoff writes only the global one.
            raise CheckpointError(f"{self.path}: birkhoff reads only its {METADATA}")
        metadata = load_metadata(Path(self.path))
        if metadata.storage_meta is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that it never torch.loads a pickled value."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise CheckpointError(
            f"{read_item.dest_index.fqn}: the checkpoint stores it as a pickled object, not a "
            "tensor; this checkpoint is not safe to open"
        )


def load_checkpoint_tensors(
    state: dict[str, torch.Tensor], path: Path, no_dist: bool = False
) -> None:
    """dcp.load of `state` from checkpoint `path`, in place, reading nothing unsafely."""
    # Refused here, with its own message: inside dcp.load a failed read of the metadata is
    # caught, and DCP tries per-rank metadata files and reports that instead.
    load_metadata(path)
    reader = SafeFileSystemReader(str(path))
    try:
        dcp.load(state, storage_reader=reader, planner=TensorsOnlyPlanner(), no_dist=no_dist)
    except CheckpointException as err:  # DCP wraps what each rank raised: report ours as is
        for failure, _ in err.failures.values():
            if isinstance(failure, CheckpointError):
                raise failure from None
        raise
