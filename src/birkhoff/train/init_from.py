"""`train.init_from`: start a run at step 0, with a fresh optimizer, from the model weights of a
birkhoff checkpoint (step-N/) or of a directory `ckpt export --to safetensors` or `ckpt import
--from hf` wrote. The weights load into the whole model before it is parallelised, so any
layout takes them. A run that resumes its own checkpoint resumes that instead."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from birkhoff.checkpoint import CheckpointError
from birkhoff.checkpoint.contents import read_tensors, tensor_metadata
from birkhoff.checkpoint.export import CONFIG, load_exported
from birkhoff.checkpoint.manager import HASH_TABLE, META, read_meta
from birkhoff.model.config import ModelConfig
from birkhoff.train.checkpointing import flatten_config

MODEL_PREFIX = "model."
# Settings that do not change what the weights mean: they may differ from the source's.
TRAINING_ONLY = {
    "max_seq_len",
    "init_std",
    "sparse_budget",
    "engram_fraction",
    "residual.alpha_init",
    "residual.pre_init_logit",
    "residual.res_init_logit",
    "residual.tolerance",
    "residual.stats_tokens",
    "attention.index_loss_weight",
    "moe.bias_update_rate",
    "moe.seq_aux_loss_coef",
    "engram.lr_multiplier",
    "mtp.loss_weight",
}


def load_initial_weights(model: nn.Module, path: Path, announce: bool = True) -> None:
    """Put the weights of `path` into `model` (whole, unsharded). Refuses another architecture,
    naming the overrides that would give the source's."""
    weights, saved = _read(path, list(model.state_dict()))
    wanted = flatten_config(dataclasses.asdict(model.cfg))
    had = {**flatten_config(dataclasses.asdict(ModelConfig())), **flatten_config(saved)}
    ignored = TRAINING_ONLY | _unused(wanted)
    different = [key for key in wanted if key not in ignored and had.get(key) != wanted[key]]
    if different:
        overrides = " ".join(f"model.{key}={_override(had.get(key))}" for key in different)
        raise CheckpointError(
            f"train.init_from={path} holds another model; to start from it, set: {overrides}"
        )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not name.endswith(HASH_TABLE)]  # older: the seed's
    if missing or unexpected:
        raise CheckpointError(
            f"train.init_from={path}: tensors missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if announce:
        print(f"birkhoff: starting from the weights of {path} (step 0, a new optimizer)")


def _read(path: Path, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights by model name, the model config recorded with them)."""
    if (path / META).is_file():
        saved = tensor_metadata(path)
        found = [MODEL_PREFIX + n for n in names if MODEL_PREFIX + n in saved]
        tensors = read_tensors(path, found)
        weights = {name.removeprefix(MODEL_PREFIX): tensor for name, tensor in tensors.items()}
        return weights, read_meta(path)["model"]
    config = path / CONFIG
    if config.is_file() and json.loads(config.read_text()).get("format") == "birkhoff":
        weights, values = load_exported(path)
        return weights, values["model"]
    raise CheckpointError(
        f"train.init_from={path}: neither a birkhoff checkpoint ({META}) nor a directory that "
        "`birkhoff ckpt export --to safetensors` or `ckpt import --from hf` wrote"
    )


def _unused(flat: dict[str, Any]) -> set[str]:
    """Keys this architecture does not read (so a source may hold any value)."""
    unused = set()
    if flat["attention.kind"] == "v4":
        unused.add("num_kv_heads")
    else:
        unused |= {key for key in flat if key.startswith("attention.") and key != "attention.kind"}
    moe_everywhere = flat["moe.num_experts"] > 0 and flat["moe.first_k_dense"] == 0
    if moe_everywhere:
        unused.add("ffn_hidden_size")
    if flat["moe.num_experts"] == 0:
        unused |= {key for key in flat if key.startswith("moe.") and key != "moe.num_experts"}
    if not flat["engram.layers"]:
        unused |= {key for key in flat if key.startswith("engram.")}
    if flat["residual.mode"] == "plain":
        unused |= {key for key in flat if key.startswith("residual.") and key != "residual.mode"}
    elif flat["residual.form"] == "paper":
        unused.add("residual.eps")
    return unused


def _override(value: Any) -> str:
    """A value as a Hydra command-line override writes it."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_override(item) for item in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
