"""`ckpt import --from hf` and `train.init_from`: a checkpoint that transformers' own
DeepseekV4ForCausalLM initialised and saved (DeepSeek's released names, experts one by one,
several files) becomes a birkhoff model with transformers' logits, and a run starts from it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from test_hf_parity import HF_COMPATIBLE, v4_config
from test_train import train_in_process

from birkhoff.checkpoint import CheckpointError
from birkhoff.checkpoint.contents import read_tensors
from birkhoff.checkpoint.export import load_exported
from birkhoff.checkpoint.hf_deepseek_v4 import (
    hf_config_kwargs,
    model_config_from_dict,
    mtp_tensor_plan,
    to_hf_state_dict,
)
from birkhoff.checkpoint.hf_import import model_config_from_hf
from birkhoff.launch.cli import main as cli_main
from birkhoff.launch.recipe import load_recipe
from birkhoff.model import build_model
from birkhoff.model.config import MTPConfig
from birkhoff.train.init_from import load_initial_weights
from conftest import SMALL_OVERRIDES, compose_recipe

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory):
    """transformers' model of the recipe's HF-compatible shape, its own init moved off (every
    parameter, routing biases, a valid token -> experts table), saved in files of 100 KB."""
    recipe, _ = load_recipe(compose_recipe([*SMALL_OVERRIDES, *HF_COMPATIBLE]), env={})
    config = transformers.DeepseekV4Config(**hf_config_kwargs(build_model(recipe.model).cfg))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = transformers.DeepseekV4ForCausalLM(config).float()
    generator = torch.Generator().manual_seed(3)
    experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    with torch.no_grad():
        for param in theirs.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
        for name, buffer in theirs.named_buffers():
            if name.endswith("tid2eid"):
                rows = [torch.randperm(experts, generator=generator)[:top_k] for _ in buffer]
                buffer.copy_(torch.stack(rows))
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
    source = tmp_path_factory.mktemp("hf") / "v4"
    theirs.save_pretrained(source, max_shard_size="100KB")
    return theirs, source


def test_a_transformers_checkpoint_imports_with_its_logits(saved_by_transformers, capsys):
    theirs, source = saved_by_transformers
    assert len(list(source.glob("*.safetensors"))) > 3
    names = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".experts.0.w1.weight" in name for name in names)  # DeepSeek's names
    assert cli_main(["ckpt", "import", "--from", "hf", str(source)]) == 0
    assert "train.init_from=" in capsys.readouterr().out
    weights, config = load_exported(source.with_name("v4-birkhoff"))
    ours = build_model(model_config_from_dict(config["model"]))
    ours.load_state_dict(weights, strict=True)
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=torch.Generator())
    with torch.no_grad():  # measured 1e-6 on logits up to ~2
        torch.testing.assert_close(ours(tokens), theirs(input_ids=tokens).logits, rtol=0, atol=5e-6)
    assert cli_main(["ckpt", "import", "--from", "hf", str(source)]) == 2  # never replaced


def test_a_run_starts_from_the_imported_weights(saved_by_transformers, tmp_path):
    """One step at lr 1e-12 with balancing off leaves the weights where init_from put them."""
    _, source = saved_by_transformers
    imported = source.with_name("v4-birkhoff")
    if not imported.exists():
        assert cli_main(["ckpt", "import", "--from", "hf", str(source)]) == 0
    weights, _ = load_exported(imported)
    steps = ["train.steps=1", "optim.warmup_steps=0", "optim.lr=1e-12", "train.eval_every=0"]
    balancing_off = ["model.moe.bias_update_rate=0", "model.mtp.depth=0"]  # saved without MTP
    overrides = [*HF_COMPATIBLE, *steps, *balancing_off, "checkpoint.every=1"]
    train_in_process(tmp_path / "run", [*overrides, f"train.init_from={imported}"])
    saved = read_tensors(
        tmp_path / "run" / "checkpoints" / "step-00000001", [f"model.{n}" for n in weights]
    )
    for name, tensor in weights.items():
        torch.testing.assert_close(saved[f"model.{name}"], tensor, rtol=0, atol=1e-9, msg=name)
    recorded = json.loads((imported / "config.json").read_text())["model"]
    other = build_model(dataclasses.replace(model_config_from_dict(recorded), rope_theta=5e5))
    with pytest.raises(CheckpointError, match=r"to start from it, set: model.rope_theta=10000.0$"):
        load_initial_weights(other, imported)


def test_our_export_imports_back_bit_for_bit(tmp_path):
    """transformers' names (as `ckpt export --to hf` writes them) and the MTP depth under
    DeepSeek's names, over two files, import to exactly our tensors, hash table included."""
    torch.manual_seed(0)
    ours = build_model(dataclasses.replace(v4_config(), mtp=MTPConfig(depth=1)))
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(0.05 * torch.randn_like(param))
    state = {k: v.detach() for k, v in ours.state_dict().items()}
    mtp = {
        n: t.combine(*(state[s] for s in t.sources)) for n, t in mtp_tensor_plan(ours.cfg).items()
    }
    source = tmp_path / "exported"
    source.mkdir()
    main = {name: tensor.contiguous() for name, tensor in to_hf_state_dict(ours).items()}
    save_file(main, str(source / "model-00001-of-00002.safetensors"))
    save_file(mtp, str(source / "model-00002-of-00002.safetensors"))
    (source / "config.json").write_text(json.dumps(hf_config_kwargs(ours.cfg)))
    assert (
        cli_main(["ckpt", "import", "--from", "hf", str(source), "--out", str(tmp_path / "o")]) == 0
    )
    weights, config = load_exported(tmp_path / "o")
    imported = model_config_from_dict(config["model"])  # transformers has no dense FFN width
    unused = {"ffn_hidden_size": ours.cfg.ffn_hidden_size}
    assert dataclasses.replace(imported, **unused) == ours.cfg
    assert sorted(weights) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(weights[name], tensor), name


# DeepSeek's released config.json for V4-Flash, its shape scaled down: per-layer compression
# ratios (0: sliding only; the last entry is the MTP layer's), `rope_scaling` for YaRN, hash
# layers counted, the RoPE width as `qk_rope_head_dim`.
RELEASED = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 128,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "head_dim": 32,
    "qk_rope_head_dim": 8,
    "q_lora_rank": 32,
    "o_groups": 2,
    "o_lora_rank": 16,
    "sliding_window": 16,
    "compress_ratios": [0, 0, 4, 128, 0],
    "compress_rope_theta": 160000,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "max_position_embeddings": 1048576,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "num_hash_layers": 2,
    "num_nextn_predict_layers": 1,
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 4,
    "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
}


def test_deepseeks_released_config_reads_as_the_model_it_describes():
    cfg = model_config_from_hf(RELEASED)
    a = cfg.attention
    assert a.layer_types == ["sliding", "sliding", "csa", "hca"]
    assert (a.csa_ratio, a.hca_ratio, a.rope_head_dim) == (4, 128, 8)
    yarn = (a.yarn_factor, a.yarn_original_seq_len, a.yarn_beta_fast, a.yarn_beta_slow)
    assert yarn == (16.0, 65536, 32.0, 1.0)
    assert (cfg.moe.hash_layers, cfg.moe.first_k_dense, cfg.moe.swiglu_limit) == (2, 0, 10.0)
    assert (cfg.mtp.depth, cfg.max_seq_len, cfg.residual.form) == (1, 1048576, "v4")
    scaled = {**RELEASED, "rope_scaling": {**RELEASED["rope_scaling"], "attention_factor": 1.3}}
    with pytest.raises(CheckpointError, match="attention_factor"):
        model_config_from_hf(scaled)
