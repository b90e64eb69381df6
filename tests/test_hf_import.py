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
    unused = {"ffn_hidden_size": ours.cfg.ffn_hidden_size, "max_seq_len": ours.cfg.max_seq_len}
    assert dataclasses.replace(imported, **unused) == ours.cfg
    assert sorted(weights) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(weights[name], tensor), name
