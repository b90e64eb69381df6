import itertools

import pytest
import torch

from birkhoff.model import build_model
from birkhoff.model.config import ResidualConfig
from birkhoff.train.config import OptimConfig
from birkhoff.train.optim import build_optimizer, param_groups
from birkhoff.train.schedule import lr_multiplier
from conftest import small_model


def test_warmup_then_cosine_to_the_floor_on_the_last_step():
    f = lr_multiplier(OptimConfig(warmup_steps=10, min_lr_ratio=0.1, schedule="cosine"), 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) < 1.0
    assert f(59) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(109) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(9, 110)]
    assert all(a > b for a, b in itertools.pairwise(values))


def test_warmup_stable_decay():
    f = lr_multiplier(
        OptimConfig(warmup_steps=5, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2), 100
    )
    assert f(4) == pytest.approx(1.0)
    assert all(f(s) == 1.0 for s in range(5, 80))
    assert f(80) == pytest.approx(0.95) and f(89) == pytest.approx(0.5)
    assert f(99) == pytest.approx(0.0)


def test_constant_schedule_and_no_warmup():
    f = lr_multiplier(OptimConfig(warmup_steps=0, schedule="constant"), 50)
    assert [f(s) for s in (0, 25, 49)] == [1.0, 1.0, 1.0]


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = build_model(
        small_model(
            residual=ResidualConfig(mode="plain"),
        )
    )
    model.register_parameter("extra_bias", torch.nn.Parameter(torch.zeros(16)))
    decay, no_decay = param_groups(model, 0.1, 1e-3)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in no_decay_ids}
    assert names == {"embedding.weight", "norm.weight", "extra_bias"} | {
        f"blocks.{i}.{n}.weight" for i in range(2) for n in ("attention_norm", "ffn_norm")
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_scheduler_drives_the_optimizer_lr():
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = build_optimizer(model, OptimConfig(lr=1.0, warmup_steps=4), 20)
    lrs = []
    for _ in range(5):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] < 1.0


def test_mhc_static_biases_and_gains_are_not_decayed():
    model = build_model(
        small_model(
            num_layers=1,
        )
    )
    decay, _ = param_groups(model, 0.1, 1e-3)
    decayed = {name for name, p in model.named_parameters() if any(p is q for q in decay["params"])}
    assert "blocks.0.attention_residual.bias_res" not in decayed
    assert "blocks.0.attention_residual.alpha" not in decayed
    assert "blocks.0.attention_residual.proj.weight" in decayed
