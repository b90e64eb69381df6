"""`birkhoff ckpt import --from hf DIR --out OUT`: a DeepseekV4 checkpoint in transformers'
format (config.json + safetensors shards) as birkhoff's exported format (`ckpt export --to
safetensors`), which `train.init_from` starts a run from.

Tensor names may be transformers' (what `ckpt export --to hf` writes) or DeepSeek's released
ones (what `save_pretrained` writes, experts one by one); transformers' own renames
(conversion_mapping.py) bring both to transformers' names, and the exporter's plan, run
backwards, to ours. MTP depths (`mtp.{k}.*`, DeepSeek's names) come back through the exporter's
MTP plan. Output files are made one at a time from the source tensors they need (read lazily),
so memory stays near one output file plus the sources of its largest tensor.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from birkhoff.checkpoint.errors import CheckpointError
from birkhoff.checkpoint.export import CONFIG, DTYPES, write_weights
from birkhoff.checkpoint.hf_deepseek_v4 import (
    LAYER_TYPES,
    hf_tensor_plan,
    mtp_tensor_plan,
    unchanged,
)
from birkhoff.model.config import (
    AttentionConfig,
    EngramConfig,
    ModelConfig,
    MoEConfig,
    MTPConfig,
    ResidualConfig,
)
from birkhoff.model.summary import build_on_meta

NEEDS_TRANSFORMERS = "--from hf needs transformers ({}): install birkhoff[hf]"
# DeepSeek's released names hold experts one by one: layers.{i}.ffn.experts.{e}.w{1,2,3}.weight
EXPERT = re.compile(r"(?P<layer>.+)\.experts\.(?P<index>\d+)\.(?P<weight>w[123])\.weight")


@dataclass(frozen=True)
class Lazy:
    """A tensor made on demand by `make` from the source tensors named `keys`."""

    keys: tuple[str, ...]
    make: Callable[..., torch.Tensor] | None  # None: the experts' weights `keys`, stacked


# A transformers tensor from a source file, or (DeepSeek's experts one by one) the pieces the
# plan's `split` would take it apart into, made straight from the experts' tensors.
Source = Lazy | tuple[Lazy, ...]


def model_config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Our model config for a DeepseekV4 config.json: transformers' own (what save_pretrained
    writes) or DeepSeek's released one (`compress_ratios`, `rope_scaling`, `num_hash_layers`),
    read through transformers' DeepseekV4Config, which turns the second into the first."""
    try:
        from transformers import DeepseekV4Config
    except ImportError as err:
        raise CheckpointError(NEEDS_TRANSFORMERS.format(err)) from None
    values = DeepseekV4Config.from_dict(raw).to_dict()
    rope = values["rope_parameters"]
    if rope["main"]["rope_type"] != "default":
        raise CheckpointError(
            f"config.json rope_parameters.main.rope_type={rope['main']['rope_type']}: V4 scales "
            "only the compressed layers' RoPE; birkhoff implements that (YaRN) alone"
        )
    yarn = rope["compress"]
    if yarn["rope_type"] not in ("default", "yarn") or yarn.get("attention_factor", 1.0) != 1:
        raise CheckpointError(
            f"config.json rope_parameters.compress={yarn}: birkhoff implements plain RoPE and "
            "V4's YaRN (no attention_factor) for the compressed layers"
        )
    yarn_keys = {}
    if yarn["rope_type"] == "yarn":
        yarn_keys = {
            "yarn_factor": float(yarn["factor"]),
            "yarn_original_seq_len": int(yarn["original_max_position_embeddings"]),
            "yarn_beta_fast": float(yarn.get("beta_fast") or 32),
            "yarn_beta_slow": float(yarn.get("beta_slow") or 1),
        }
    if values.get("n_shared_experts", 1) != 1:
        raise CheckpointError(f"config.json n_shared_experts={values['n_shared_experts']}: 1")
    kinds = {hf: ours for ours, hf in LAYER_TYPES.items()}
    mlp = values["mlp_layer_types"]
    hash_layers = mlp.count("hash_moe")
    if mlp != ["hash_moe"] * hash_layers + ["moe"] * (len(mlp) - hash_layers):
        raise CheckpointError(f"config.json mlp_layer_types={mlp}: hash_moe layers come first")
    head_dim, limit = values["head_dim"], values.get("swiglu_limit")
    if isinstance(limit, dict):  # transformers writes infinity as {"__float__": "Infinity"}
        limit = float(limit["__float__"])
    cfg = ModelConfig(
        vocab_size=values["vocab_size"],
        hidden_size=values["hidden_size"],
        num_layers=values["num_hidden_layers"],
        num_heads=values["num_attention_heads"],
        num_kv_heads=1,
        ffn_hidden_size=values["moe_intermediate_size"],
        max_seq_len=values.get("max_position_embeddings", 4096),
        rope_theta=values["rope_theta"],
        norm_eps=values["rms_norm_eps"],
        init_std=values.get("initializer_range", 0.02),
        tie_embeddings=values.get("tie_word_embeddings", False),
        residual=ResidualConfig(
            mode="mhc",
            form="v4" if values["hc_eps"] > 0 else "paper",
            eps=values["hc_eps"] or 1e-6,
            n_streams=values["hc_mult"],
            sinkhorn_iters=values["hc_sinkhorn_iters"],
        ),
        attention=AttentionConfig(
            kind="v4",
            head_dim=head_dim,
            rope_head_dim=round(values["partial_rotary_factor"] * head_dim),
            q_lora_rank=values["q_lora_rank"],
            o_groups=values["o_groups"],
            o_lora_rank=values["o_lora_rank"],
            sliding_window=values["sliding_window"],
            layer_types=[kinds[kind] for kind in values["layer_types"]],
            csa_ratio=values["compress_rates"]["compressed_sparse_attention"],
            hca_ratio=values["compress_rates"]["heavily_compressed_attention"],
            compress_rope_theta=values["compress_rope_theta"],
            index_heads=values["index_n_heads"],
            index_head_dim=values["index_head_dim"],
            index_topk=values["index_topk"],
            **yarn_keys,
        ),
        moe=MoEConfig(
            num_experts=values["n_routed_experts"],
            num_shared_experts=1,
            top_k=values["num_experts_per_tok"],
            expert_ffn_hidden_size=values["moe_intermediate_size"],
            score_func="sqrt_softplus" if values["scoring_func"] == "sqrtsoftplus" else "sigmoid",
            route_scale=values["routed_scaling_factor"],
            first_k_dense=0,
            hash_layers=hash_layers,
            swiglu_limit=None if limit is None or limit == float("inf") else limit,
        ),
        engram=EngramConfig(layers=[]),
        mtp=MTPConfig(depth=values.get("num_nextn_predict_layers", 0)),
    )
    cfg.validate()
    return cfg


def import_hf(
    src: Path, out: Path | None = None, dtype: str | None = None, max_shard_gib: float = 5.0
) -> Path:
    """Convert the transformers DeepseekV4 checkpoint in `src` to `out` (default `<src>-birkhoff`,
    never replaced). Returns `out`."""
    if not (src / CONFIG).is_file():
        raise CheckpointError(f"{src}: no config.json; --from hf takes a transformers directory")
    cfg = model_config_from_hf(json.loads((src / CONFIG).read_text()))
    out = out or src.with_name(f"{src.name}-birkhoff")
    if out.exists():
        raise CheckpointError(f"{out} already exists; remove it or choose another with --out")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")
    reader = _Reader(src)
    if cfg.mtp.depth and not any(key.startswith("mtp.") for key in reader.names()):
        # save_pretrained drops the MTP depths transformers does not build
        print(f"birkhoff: {src} holds no mtp.* tensors: imported without MTP (model.mtp.depth=0)")
        cfg = dataclasses.replace(cfg, mtp=MTPConfig(depth=0))
    expected = build_on_meta(cfg).state_dict()
    made = _our_tensors(cfg, _transformers_names(reader.names()))
    if sorted(made) != sorted(expected):  # the plans cover the model exactly
        raise CheckpointError(f"{src}: cannot make {sorted(set(expected) ^ set(made))[:5]}")
    itemsize = DTYPES[dtype].itemsize if dtype else None
    sizes = {
        name: tensor.numel()
        * (itemsize if itemsize and tensor.is_floating_point() else tensor.element_size())
        for name, tensor in expected.items()
    }

    def tensors(names: list[str]) -> dict[str, torch.Tensor]:
        return {name: reader.make(made[name]) for name in names}

    config = {
        "format": "birkhoff",
        "model": dataclasses.asdict(cfg),
        "tokenizer": None,
        "step": 0,
        "tokens_seen": 0,
        "dtype": dtype or "as saved",
        "source": str(src),
    }
    return write_weights(out, sizes, tensors, config, dtype, max_shard_gib)


class _Reader:
    """The safetensors files of a directory, read a tensor at a time (memory-mapped)."""

    def __init__(self, src: Path) -> None:
        self.files: dict[str, Path] = {}
        for file in sorted(src.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), file))
        if not self.files:
            raise CheckpointError(f"{src}: no *.safetensors files")
        quantised = [  # an FP8/FP4 weight's scales sit beside it (mHC's `scale`s stand alone)
            key
            for key in self.files
            if key.endswith(".scale") and key.removesuffix(".scale") + ".weight" in self.files
        ]
        if quantised:
            raise CheckpointError(
                f"{src} holds quantised weights with scales ({quantised[0]}, ...): dequantise "
                "them to bfloat16 or float32 first"
            )

    def names(self) -> list[str]:
        return list(self.files)

    def make(self, lazy: Lazy) -> torch.Tensor:
        if lazy.make is not None:
            return lazy.make(*(self.get(key) for key in lazy.keys))
        # Experts' (F, C) or (C, F) weights into our (E, C, F) or (E, F, C) tensor, read one
        # at a time: memory holds the result and one expert, not every expert twice.
        first = self.get(lazy.keys[0]).t()
        stacked = torch.empty((len(lazy.keys), *first.shape), dtype=first.dtype)
        stacked[0] = first
        for index, key in enumerate(lazy.keys[1:], start=1):
            stacked[index] = self.get(key).t()
        return stacked

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.files[key]), "pt") as handle:
            return handle.get_tensor(key)


def _transformers_names(keys: list[str]) -> dict[str, Source]:
    """Source keys -> transformers' names (MTP keys stay DeepSeek's): renamed by transformers'
    own table, experts stacked (and w1|w3 concatenated) as its converter does."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError as err:
        raise CheckpointError(NEEDS_TRANSFORMERS.format(err)) from None
    rules = get_checkpoint_conversion_mapping("deepseek_v4") or []
    renames = [rule for rule in rules if isinstance(rule, WeightRenaming)]
    names: dict[str, Source] = {}
    experts: dict[str, dict[str, dict[int, str]]] = {}
    for key in keys:
        if key.startswith("mtp."):
            names[key] = Lazy((key,), unchanged)
            continue
        renamed = apply_renamings(key.removeprefix("model."), renames)
        renamed = renamed if renamed == "lm_head.weight" else "model." + renamed
        expert = EXPERT.fullmatch(renamed)
        if expert:
            per_weight = experts.setdefault(expert["layer"], {"w1": {}, "w2": {}, "w3": {}})
            per_weight[expert["weight"]][int(expert["index"])] = key
        else:
            names[renamed] = Lazy((key,), unchanged)
    for layer, per_weight in experts.items():
        w1, w2, w3 = (tuple(found[e] for e in sorted(found)) for found in per_weight.values())
        # Our (E, C, F) tensors come straight from the experts' (F, C) ones: no fused copy.
        names[f"{layer}.experts.gate_up_proj"] = (Lazy(w1, None), Lazy(w3, None))
        names[f"{layer}.experts.down_proj"] = (Lazy(w2, None),)
    return names


def _our_tensors(cfg: ModelConfig, names: dict[str, Source]) -> dict[str, Lazy]:
    """Our state dict, tensor by tensor, from transformers' (and DeepSeek's MTP) names."""
    made: dict[str, Lazy] = {}
    missing: list[str] = []
    per_expert: dict[str, list[str]] = {}
    for name, item in (hf_tensor_plan(cfg) | mtp_tensor_plan(cfg)).items():
        if name not in names:
            missing.append(name)
            continue
        if item.split is None:  # one expert of an MTP layer: stacked below
            per_expert.setdefault(item.sources[0], []).append(name)
            continue
        source = names[name]
        for index, ours in enumerate(item.sources):
            made[ours] = (
                source[index]
                if isinstance(source, tuple)
                else Lazy(source.keys, lambda *t, s=source, i=index, f=item.split: f(s.make(*t))[i])
            )
    if missing:
        raise CheckpointError(f"no tensor {missing[0]} (and {len(missing) - 1} more)")
    for ours, experts in per_expert.items():
        keys = tuple(names[name].keys[0] for name in experts)
        made[ours] = Lazy(keys, None)
    for layer in range(cfg.num_layers):  # a hash layer's router bias: unused, zero
        if cfg.moe.is_hash_layer(layer):
            bias = f"blocks.{layer}.ffn.router.bias"
            made[bias] = Lazy((), lambda n=cfg.moe.num_experts: torch.zeros(n))
    return made
