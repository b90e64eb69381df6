"""`birkhoff ckpt inspect PATH`: what a checkpoint holds, read without loading any tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from birkhoff.checkpoint.contents import stored_bytes, tensor_metadata
from birkhoff.checkpoint.manager import COMPLETE, META, RANKS, CheckpointError, read_meta
from birkhoff.checkpoint.space import disk_bytes


def describe_checkpoint(path: Path) -> dict[str, Any]:
    """Step, tokens, layout, recipe, completeness, and every tensor's shape and dtype (from
    DCP's metadata), with their total size and the bytes on disk."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    complete = (path / COMPLETE).is_file()
    meta = read_meta(path) if complete else {}
    tensors = {}
    for name, item in tensor_metadata(path).items():
        dtype = item.properties.dtype
        tensors[name] = {"shape": list(item.size), "dtype": str(dtype).removeprefix("torch.")}
        tensors[name]["bytes"] = stored_bytes(item)
    return {
        "path": str(path),
        "complete": complete,
        "step": meta.get("step"),
        "tokens_seen": meta.get("tokens_seen"),
        "world_size": meta.get("world_size"),
        "layout": meta.get("degrees"),
        "tokenizer": meta.get("tokenizer"),
        "recipe": meta.get("recipe"),
        "ranks_with_state": len(list((path / RANKS).glob("rank-*.json"))),
        "tensor_bytes": sum(t["bytes"] for t in tensors.values()),
        "disk_bytes": disk_bytes(path),
        "tensors": tensors,
    }


def format_description(info: dict[str, Any]) -> str:
    """The human-readable summary printed by `birkhoff ckpt inspect`."""
    state = "complete" if info["complete"] else f"INCOMPLETE (no {COMPLETE} marker)"
    lines = [
        f"{info['path']}: {state}",
        f"step {info['step']} | tokens seen {info['tokens_seen']} | "
        f"{info['world_size']} rank(s) {info['layout']}",
        f"tokenizer {info['tokenizer']}",
        f"{len(info['tensors'])} tensors, {info['tensor_bytes'] / 2**20:.1f} MiB "
        f"({info['disk_bytes'] / 2**20:.1f} MiB on disk, {info['ranks_with_state']} rank "
        f"state files, {META} holds the recipe)",
    ]
    width = max((len(name) for name in info["tensors"]), default=0)
    for name, tensor in info["tensors"].items():
        lines.append(f"  {name:<{width}}  {tensor['dtype']:<8} {tuple(tensor['shape'])}")
    return "\n".join(lines)
