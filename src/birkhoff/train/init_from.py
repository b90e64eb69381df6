"""`train.init_from`: start a run at step 0, with a fresh optimizer, from the model weights of a
birkhoff checkpoint (step-N/) or of a directory `ckpt export --to safetensors` or `ckpt import
--from hf` wrote. The weights load into the rank's shards once they are built and
materialised (train/model_share.py), each rank reading only the elements it holds, so any
layout takes them. A run that resumes its own checkpoint resumes that instead."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from birkhoff.checkpoint import CheckpointError
from birkhoff.checkpoint.contents import tensor_metadata
from birkhoff.checkpoint.export import CONFIG, exported_files
from birkhoff.checkpoint.manager import HASH_TABLE, META, read_meta
from birkhoff.checkpoint.safe_metadata import load_checkpoint_tensors
from birkhoff.model.config import ModelConfig
from birkhoff.model.init import clean_name, local_part, named_tensors
from birkhoff.model.transformer import Transformer
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


def load_initial_weights(
    parts: nn.Module | list[nn.Module], path: Path, announce: bool = True
) -> None:
    """Put the weights of `path` into `parts` (the whole model, or this rank's pipeline chunks),
    sharded or not: each rank reads only the elements it holds. Refuses another architecture,
    naming the overrides that would give the source's."""
    parts = [parts] if isinstance(parts, nn.Module) else parts
    cfg = parts[0].cfg
    source = _Source(path)
    wanted = flatten_config(dataclasses.asdict(cfg))
    had = {**flatten_config(dataclasses.asdict(ModelConfig())), **flatten_config(source.config)}
    ignored = TRAINING_ONLY | _unused(wanted)
    different = [key for key in wanted if key not in ignored and had.get(key) != wanted[key]]
    if different:
        overrides = " ".join(f"model.{key}={_override(had.get(key))}" for key in different)
        raise CheckpointError(
            f"train.init_from={path} holds another model; to start from it, set: {overrides}"
        )
    with torch.device("meta"):  # the whole model's names, for what the source holds extra
        model_names = set(Transformer(cfg).state_dict())
    unexpected = sorted(set(source.names) - model_names)
    missing = sorted(
        name
        for name in model_names - set(source.names)
        if not name.endswith(HASH_TABLE)  # older sources: the seed's table stays
    )
    if missing or unexpected:
        raise CheckpointError(
            f"train.init_from={path}: tensors missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for part in parts:
        persistent = {clean_name(name) for name in part.state_dict()}
        held = {n: t for n, t, _ in named_tensors(part) if n in persistent and n in source.names}
        source.read_into(held)
    if announce:
        print(f"birkhoff: starting from the weights of {path} (step 0, a new optimizer)")


class _Source:
    """A birkhoff checkpoint (DCP) or an exported / imported safetensors directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if (path / META).is_file():
            self.kind = "dcp"
            saved = tensor_metadata(path)
            self.names = [n.removeprefix(MODEL_PREFIX) for n in saved if n.startswith(MODEL_PREFIX)]
            self.config = read_meta(path)["model"]
            return
        config = path / CONFIG
        if config.is_file() and json.loads(config.read_text()).get("format") == "birkhoff":
            self.kind = "safetensors"
            self.files = exported_files(path)
            self.names = list(self.files)
            self.config = json.loads(config.read_text())["model"]
            return
        raise CheckpointError(
            f"train.init_from={path}: neither a birkhoff checkpoint ({META}) nor a directory "
            "that `birkhoff ckpt export --to safetensors` or `ckpt import --from hf` wrote"
        )

    @torch.no_grad()
    def read_into(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fill this rank's elements of every tensor (by model name) in place."""
        if self.kind == "dcp":
            state = {MODEL_PREFIX + name: t.detach() for name, t in tensors.items()}
            load_checkpoint_tensors(state, self.path, no_dist=True)
            return
        for name, tensor in tensors.items():
            local, region = local_part(tensor.detach())
            with safe_open(str(self.path / self.files[name]), "pt") as file:
                stored = file.get_slice(name)
                if tuple(stored.get_shape()) != tuple(tensor.shape):
                    raise CheckpointError(
                        f"train.init_from={self.path}: {name} has shape "
                        f"{tuple(stored.get_shape())}, the model {tuple(tensor.shape)}"
                    )
                value = stored[region] if region else file.get_tensor(name)
            local.copy_(value.to(local.dtype))


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
