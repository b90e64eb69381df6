"""`birkhoff ckpt export PATH --to safetensors|hf`: a checkpoint's model weights, whole (DCP
merges every rank's shards), as safetensors files plus a config.json for inference or
conversion: birkhoff's own names (`safetensors`), or transformers' DeepseekV4ForCausalLM
(`hf`: its config.json and names, loadable with `from_pretrained`).

    <out>/config.json                       model config, tokenizer identity, step, source
    <out>/model.safetensors                 one file while the weights fit in --max-shard-gib,
    <out>/model-00001-of-00003.safetensors  else numbered files and
    <out>/model.safetensors.index.json      the Hugging Face index (weight name -> file)

Names are the model's own parameter and buffer names (`model.load_state_dict` takes them).
One file's tensors are read at a time, so memory stays near one file's size. The directory is
written under a temporary name and renamed when complete; an existing one is never replaced.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from birkhoff.atomic import write_text_atomic
from birkhoff.checkpoint.contents import read_tensors, stored_bytes, tensor_metadata
from birkhoff.checkpoint.errors import CheckpointError
from birkhoff.checkpoint.hf_deepseek_v4 import (
    hf_config_kwargs,
    hf_incompatibilities,
    hf_tensor_plan,
    model_config_from_dict,
    mtp_tensor_plan,
)
from birkhoff.checkpoint.integrity import problems, read_checksums, unlisted
from birkhoff.checkpoint.manager import read_meta

MODEL_PREFIX = "model."
CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_safetensors(
    path: Path, out: Path | None = None, dtype: str | None = None, max_shard_gib: float = 5.0
) -> Path:
    """Write the model weights of checkpoint `path` to `out` (default: `<path>-safetensors`
    beside it); floating-point tensors are cast to `dtype` if given. Returns `out`."""
    meta = read_meta(path)
    out = _check_target(path, out or path.with_name(f"{path.name}-safetensors"), dtype)
    sizes = _model_tensor_bytes(path, dtype)

    def tensors(names: list[str]) -> dict[str, torch.Tensor]:
        found = read_tensors(path, [MODEL_PREFIX + n for n in names])
        return {n: found[MODEL_PREFIX + n] for n in names}

    return write_weights(out, sizes, tensors, _config(path, meta, dtype), dtype, max_shard_gib)


def export_hf(
    path: Path, out: Path | None = None, dtype: str | None = None, max_shard_gib: float = 5.0
) -> Path:
    """Write checkpoint `path` as transformers' DeepseekV4ForCausalLM to `out` (default:
    `<path>-hf`): config.json and safetensors under transformers' names, each made from the
    checkpoint's tensors of one file at a time. Returns `out`."""
    cfg = model_config_from_dict(read_meta(path)["model"])
    problems = hf_incompatibilities(cfg)
    if problems:
        raise CheckpointError(f"{path} cannot be a DeepseekV4ForCausalLM: {'; '.join(problems)}")
    out = _check_target(path, out or path.with_name(f"{path.name}-hf"), dtype)
    plan = hf_tensor_plan(cfg) | mtp_tensor_plan(cfg)
    source_bytes = _model_tensor_bytes(path, dtype)
    users = Counter(source for item in plan.values() for source in item.sources)
    sizes = {  # an MTP expert is a slice of its layer's tensor: each counts its share
        name: sum(source_bytes[s] // users[s] for s in item.sources) for name, item in plan.items()
    }

    def tensors(names: list[str]) -> dict[str, torch.Tensor]:
        needed = sorted({source for name in names for source in plan[name].sources})
        found = read_tensors(path, [MODEL_PREFIX + source for source in needed])
        return {
            name: plan[name].combine(*(found[MODEL_PREFIX + s] for s in plan[name].sources))
            for name in names
        }

    config = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "torch_dtype": dtype or "float32",
        **hf_config_kwargs(cfg),
    }
    return write_weights(out, sizes, tensors, config, dtype, max_shard_gib)


def _check_target(path: Path, out: Path, dtype: str | None) -> Path:
    _refuse_damage(path)
    if out.exists():
        raise CheckpointError(f"{out} already exists; remove it or choose another with --out")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")
    return out


def write_weights(
    out: Path,
    sizes: dict[str, int],
    tensors: Callable[[list[str]], dict[str, torch.Tensor]],
    config: dict[str, Any],
    dtype: str | None,
    max_shard_gib: float,
) -> Path:
    """Tensors named in `sizes` (bytes once written), made file by file by `tensors`, into
    safetensors files of at most `max_shard_gib` (an index when more than one), config.json
    beside them; under a temporary name renamed when complete."""
    files = _pack(sizes, int(max_shard_gib * 2**30))
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weight_map = {}
    for index, names in enumerate(files):
        file_name = SINGLE_FILE if len(files) == 1 else _numbered(index, len(files))
        made = tensors(names)
        save_file(
            {n: _cast(made[n], dtype).contiguous() for n in names},
            str(staging / file_name),
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(names, file_name))
        del made  # before the next file's tensors are made: one file in memory at a time
    if len(files) > 1:
        index_file = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        write_text_atomic(staging / INDEX, json.dumps(index_file, indent=1, sort_keys=True))
    write_text_atomic(staging / CONFIG, json.dumps(config, indent=2) + "\n")
    staging.rename(out)
    return out


def load_exported(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights (by model parameter name) and config.json of an exported directory."""
    config = json.loads((out / CONFIG).read_text())
    weights: dict[str, torch.Tensor] = {}
    for file_name in sorted(set(exported_files(out).values())):
        weights.update(load_file(str(out / file_name)))
    return weights, config


def exported_files(out: Path) -> dict[str, str]:
    """Which file of an exported directory holds each tensor (by model parameter name)."""
    if (out / INDEX).is_file():
        return json.loads((out / INDEX).read_text())["weight_map"]
    with safe_open(str(out / SINGLE_FILE), "pt") as file:
        return dict.fromkeys(file.keys(), SINGLE_FILE)


def _refuse_damage(path: Path) -> None:
    expected = read_checksums(path)
    damage = problems(path, expected, sorted(expected)) + unlisted(path, expected)
    if damage:
        raise CheckpointError(f"{'; '.join(damage)}: export an intact checkpoint instead")


def _model_tensor_bytes(path: Path, dtype: str | None) -> dict[str, int]:
    """Model tensor name (without the prefix) -> bytes once exported."""
    target = DTYPES[dtype] if dtype else None
    return {
        name.removeprefix(MODEL_PREFIX): stored_bytes(item, target)
        for name, item in tensor_metadata(path).items()
        if name.startswith(MODEL_PREFIX)
    }


def _pack(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Tensors in name order into files of at most `limit` bytes (a larger tensor alone)."""
    files: list[list[str]] = [[]]
    used = 0
    for name in sorted(sizes):
        if files[-1] and used + sizes[name] > limit:
            files.append([])
            used = 0
        files[-1].append(name)
        used += sizes[name]
    return files


def _numbered(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _cast(tensor: torch.Tensor, dtype: str | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(DTYPES[dtype])


def _config(path: Path, meta: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    return {
        "format": "birkhoff",
        "model": meta["model"],
        "tokenizer": meta["tokenizer"],
        "step": meta["step"],
        "tokens_seen": meta["tokens_seen"],
        "dtype": dtype or "as saved",
        "source": str(path),
    }
