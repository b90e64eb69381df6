"""birkhoff's model as transformers' DeepseekV4ForCausalLM: its config and its weights.

What maps: V4 attention (every layer type), mHC (transformers' `fn`/`base`/`scale` are our
projection, biases and gating factors, with the residual matrix transposed: transformers mixes
streams as comb^T x, we as H_res x), MoE with one shared expert, hash-routed layers (their
token -> experts table travels as `tid2eid`), embedding, readout, norm and head. What does not:
Engram and dense FFN layers (transformers' V4 has neither), GQA attention, plain or HC
residuals, group-limited routing; `hf_incompatibilities` names each. transformers builds no
MTP depth (it skips `mtp.*` on load): `mtp_tensor_plan` keeps them under DeepSeek's released
names (inference/model.py's MTPBlock), which transformers' own renames map onto a layer's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from birkhoff.model.config import ModelConfig

LAYER_TYPES = {
    "sliding": "sliding_attention",
    "csa": "compressed_sparse_attention",
    "hca": "heavily_compressed_attention",
}
HYPER_CONNECTIONS = (("attention_residual", "attn_hc"), ("ffn_residual", "ffn_hc"))
# Ours -> transformers', under model.layers.{i}.self_attn
ATTENTION = {
    "w_q_down.weight": "q_a_proj.weight",
    "q_norm.weight": "q_a_norm.weight",
    "w_q_up.weight": "q_b_proj.weight",
    "w_kv.weight": "kv_proj.weight",
    "kv_norm.weight": "kv_norm.weight",
    "w_o_groups.weight": "o_a_proj.weight",
    "w_o.weight": "o_b_proj.weight",
    "sinks": "sinks",
    "compressor.w_kv.weight": "compressor.kv_proj.weight",
    "compressor.w_gate.weight": "compressor.gate_proj.weight",
    "compressor.position_bias": "compressor.position_bias",
    "compressor.norm.weight": "compressor.kv_norm.weight",
    "indexer.compressor.w_kv.weight": "compressor.indexer.kv_proj.weight",
    "indexer.compressor.w_gate.weight": "compressor.indexer.gate_proj.weight",
    "indexer.compressor.position_bias": "compressor.indexer.position_bias",
    "indexer.compressor.norm.weight": "compressor.indexer.kv_norm.weight",
    "indexer.w_q.weight": "compressor.indexer.q_b_proj.weight",
    "indexer.w_weights.weight": "compressor.indexer.scorer.weights_proj.weight",
}


# Ours -> DeepSeek's released names for an MTP depth (a sliding-window V4 block plus its inputs
# and readout), under mtp.{k}.
MTP_NAMES = {
    "embed_proj.weight": "e_proj.weight",
    "hidden_proj.weight": "h_proj.weight",
    "embed_norm.weight": "enorm.weight",
    "hidden_norm.weight": "hnorm.weight",
    "norm.weight": "norm.weight",
    "readout.proj.weight": "hc_head_fn",
    "readout.bias": "hc_head_base",
    "readout.alpha": "hc_head_scale",
    "block.attention_norm.weight": "attn_norm.weight",
    "block.ffn_norm.weight": "ffn_norm.weight",
    "block.attention.w_q_down.weight": "attn.wq_a.weight",
    "block.attention.q_norm.weight": "attn.q_norm.weight",
    "block.attention.w_q_up.weight": "attn.wq_b.weight",
    "block.attention.w_kv.weight": "attn.wkv.weight",
    "block.attention.kv_norm.weight": "attn.kv_norm.weight",
    "block.attention.w_o_groups.weight": "attn.wo_a.weight",
    "block.attention.w_o.weight": "attn.wo_b.weight",
    "block.attention.sinks": "attn.attn_sink",
    "block.ffn.router.weight": "ffn.gate.weight",
}
UPSTREAM_SWIGLU = {"w_gate": "w1", "w_down": "w2", "w_up": "w3"}


def hf_incompatibilities(cfg: ModelConfig) -> list[str]:
    """One line per recipe value that transformers' DeepseekV4 cannot represent."""
    moe, problems = cfg.moe, []
    checks = [
        (cfg.attention.kind == "v4", "model.attention.kind", cfg.attention.kind, "v4"),
        (cfg.residual.mode == "mhc", "model.residual.mode", cfg.residual.mode, "mhc"),
        (not cfg.engram.layers, "model.engram.layers", cfg.engram.layers, "[]"),
        (moe.num_experts > 0, "model.moe.num_experts", moe.num_experts, "> 0"),
        (moe.first_k_dense == 0, "model.moe.first_k_dense", moe.first_k_dense, "0"),
        (moe.num_shared_experts == 1, "model.moe.num_shared_experts", moe.num_shared_experts, "1"),
        (moe.num_groups == 1, "model.moe.num_groups", moe.num_groups, "1"),
        (not cfg.tie_embeddings, "model.tie_embeddings", cfg.tie_embeddings, "false"),
    ]
    for ok, key, value, wanted in checks:
        if not ok:
            problems.append(f"{key}={value}: transformers' DeepseekV4 needs {wanted}")
    return problems


def hf_config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of transformers.DeepseekV4Config for this model."""
    a, moe = cfg.attention, cfg.moe
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "head_dim": a.head_dim,
        "partial_rotary_factor": a.rope_head_dim / a.head_dim,
        "q_lora_rank": a.q_lora_rank,
        "o_groups": a.o_groups,
        "o_lora_rank": a.o_lora_rank,
        "sliding_window": a.sliding_window,
        "layer_types": [LAYER_TYPES[kind] for kind in a.layer_types],
        "compress_rates": {
            "compressed_sparse_attention": a.csa_ratio,
            "heavily_compressed_attention": a.hca_ratio,
        },
        "compress_rope_theta": a.compress_rope_theta,
        "rope_theta": cfg.rope_theta,
        # transformers applies these to the compressed layers only, with attention_factor 1
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": a.yarn_factor,
            "original_max_position_embeddings": a.yarn_original_seq_len,
            "beta_fast": a.yarn_beta_fast,
            "beta_slow": a.yarn_beta_slow,
        }
        if a.yarn_factor > 1
        else None,
        "index_n_heads": a.index_heads,
        "index_head_dim": a.index_head_dim,
        "index_topk": a.index_topk,
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_ffn_hidden_size,
        "scoring_func": "sqrtsoftplus" if moe.score_func == "sqrt_softplus" else "sigmoid",
        "routed_scaling_factor": moe.route_scale,
        "swiglu_limit": moe.swiglu_limit if moe.swiglu_limit is not None else float("inf"),
        "mlp_layer_types": [
            "hash_moe" if moe.is_hash_layer(layer) else "moe" for layer in range(cfg.num_layers)
        ],
        "hc_mult": cfg.residual.n_streams,
        "hc_sinkhorn_iters": cfg.residual.sinkhorn_iters,
        # V4's eps terms; the paper form has none, which transformers computes with hc_eps=0
        "hc_eps": cfg.residual.eps if cfg.residual.form == "v4" else 0.0,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": cfg.mtp.depth,
    }


def unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _one(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor,)


@dataclass(frozen=True)
class HFTensor:
    """One of transformers' tensors: made by `combine` from our tensors named `sources`, and
    taken apart into them again by `split` (None: one of several that make one of ours)."""

    sources: tuple[str, ...]
    combine: Callable[..., torch.Tensor]
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = _one


def hf_tensor_plan(cfg: ModelConfig) -> dict[str, HFTensor]:
    """transformers' DeepseekV4ForCausalLM state dict, name by name, from ours."""
    problems = hf_incompatibilities(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    plan = {
        "model.embed_tokens.weight": HFTensor(("embedding.weight",), unchanged),
        "model.norm.weight": HFTensor(("norm.weight",), unchanged),
        "lm_head.weight": HFTensor(("head.weight",), unchanged),
        "model.hc_head.hc_fn": HFTensor(("readout.proj.weight",), unchanged),
        "model.hc_head.hc_base": HFTensor(("readout.bias",), unchanged),
        "model.hc_head.hc_scale": HFTensor(("readout.alpha",), unchanged),
    }
    n = cfg.residual.n_streams
    for layer in range(cfg.num_layers):
        mine, theirs = f"blocks.{layer}.", f"model.layers.{layer}."
        plan[theirs + "input_layernorm.weight"] = HFTensor(
            (mine + "attention_norm.weight",), unchanged
        )
        plan[theirs + "post_attention_layernorm.weight"] = HFTensor(
            (mine + "ffn_norm.weight",), unchanged
        )
        for name, hf_name in _attention_names(cfg.attention.layer_type(layer)).items():
            plan[theirs + "self_attn." + hf_name] = HFTensor(
                (mine + "attention." + name,), unchanged
            )
        for sublayer, hf_sublayer in HYPER_CONNECTIONS:
            plan.update(_hyper_connection(f"{mine}{sublayer}.", f"{theirs}{hf_sublayer}.", n))
        plan.update(_moe(cfg, layer, mine + "ffn.", theirs + "mlp."))
    return plan


def mtp_tensor_plan(cfg: ModelConfig) -> dict[str, HFTensor]:
    """The MTP depths' tensors under DeepSeek's released names (experts one by one)."""
    plan, n = {}, cfg.residual.n_streams
    for k in range(cfg.mtp.depth):
        mine = theirs = f"mtp.{k}."
        for name, upstream in MTP_NAMES.items():
            plan[theirs + upstream] = HFTensor((mine + name,), unchanged)
        for sublayer, upstream in (("attention_residual", "hc_attn_"), ("ffn_residual", "hc_ffn_")):
            plan.update(_hyper_connection(f"{mine}block.{sublayer}.", theirs + upstream, n))
        ffn = mine + "block.ffn."
        plan[theirs + "ffn.gate.bias"] = HFTensor((ffn + "router.bias",), lambda b: b.float())
        for ours, upstream in UPSTREAM_SWIGLU.items():
            plan[f"{theirs}ffn.shared_experts.{upstream}.weight"] = HFTensor(
                (f"{ffn}shared.{ours}.weight",), unchanged
            )
            for expert in range(cfg.moe.num_experts):
                plan[f"{theirs}ffn.experts.{expert}.{upstream}.weight"] = HFTensor(
                    (f"{ffn}experts.{ours}",), lambda w, e=expert: w[e].t().contiguous(), None
                )
    return plan


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers' state dict of a whole (unsharded) birkhoff model."""
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    return {
        name: item.combine(*(ours[source] for source in item.sources))
        for name, item in hf_tensor_plan(model.cfg).items()
    }


def _attention_names(layer_type: str) -> dict[str, str]:
    keep = {"sliding": (), "hca": ("compressor.",), "csa": ("compressor.", "indexer.")}[layer_type]
    return {
        name: hf_name
        for name, hf_name in ATTENTION.items()
        if not name.startswith(("compressor.", "indexer.")) or name.startswith(keep)
    }


def _hyper_connection(mine: str, theirs: str, n: int) -> dict[str, HFTensor]:
    """fn rows and base entries of the residual matrix in transformers' (transposed) order."""
    order = torch.cat((torch.arange(2 * n), 2 * n + torch.arange(n * n).view(n, n).t().flatten()))
    return {
        theirs + "fn": HFTensor(
            (mine + "proj.weight",),
            lambda proj: proj[order],
            lambda fn: (fn[torch.argsort(order)],),
        ),
        theirs + "base": HFTensor(
            (mine + "bias_pre", mine + "bias_post", mine + "bias_res"),
            lambda pre, post, res: torch.cat((pre, post, res.t().flatten())),
            lambda base: (base[:n], base[n : 2 * n], base[2 * n :].view(n, n).t().contiguous()),
        ),
        theirs + "scale": HFTensor((mine + "alpha",), unchanged),
    }


def _moe(cfg: ModelConfig, layer: int, mine: str, theirs: str) -> dict[str, HFTensor]:
    plan = {theirs + "gate.weight": HFTensor((mine + "router.weight",), unchanged)}
    if cfg.moe.is_hash_layer(layer):
        plan[theirs + "gate.tid2eid"] = HFTensor((mine + "router.hash_table",), unchanged)
    else:
        plan[theirs + "gate.e_score_correction_bias"] = HFTensor(
            (mine + "router.bias",), lambda bias: bias.float()
        )
    plan[theirs + "experts.gate_up_proj"] = HFTensor(
        (mine + "experts.w_gate", mine + "experts.w_up"),
        lambda gate, up: torch.cat((gate, up), dim=2).transpose(1, 2),
        lambda gate_up: tuple(half.transpose(1, 2).contiguous() for half in gate_up.chunk(2, 1)),
    )
    plan[theirs + "experts.down_proj"] = HFTensor(
        (mine + "experts.w_down",),
        lambda down: down.transpose(1, 2),
        lambda down: (down.transpose(1, 2).contiguous(),),
    )
    for name, hf_name in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
        plan[f"{theirs}shared_experts.{hf_name}.weight"] = HFTensor(
            (f"{mine}shared.{name}.weight",), unchanged
        )
    return plan


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """The model config a checkpoint's meta.json recorded (sized and validated when saved)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), values))
