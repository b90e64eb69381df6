"""What changes with the phase of training (train/phase_schedules.py): the MTP loss weight from
the start of LR decay, and the router biases frozen for the last steps."""

from __future__ import annotations

import pytest
import torch
from test_train import read_metrics, train_in_process

from birkhoff.checkpoint.contents import read_tensors, tensor_metadata
from birkhoff.model import build_model
from birkhoff.model.config import MTPConfig
from birkhoff.train.config import OptimConfig, TrainConfig
from birkhoff.train.phase_schedules import PhaseSchedules
from birkhoff.train.schedule import decay_start, lr_multiplier
from conftest import small_model


@pytest.mark.parametrize(
    "optim",
    [
        OptimConfig(schedule="cosine", warmup_steps=10),
        OptimConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.25),
        OptimConfig(schedule="cosine", warmup_steps=0),
    ],
)
def test_decay_starts_where_the_lr_first_falls_below_its_peak(optim):
    f = lr_multiplier(optim, 100)
    first_below = next(s for s in range(optim.warmup_steps, 100) if f(s) < 1.0)
    assert decay_start(optim, 100) == first_below


def test_a_constant_lr_never_decays():
    assert decay_start(OptimConfig(schedule="constant"), 100) is None


def test_mtp_weight_drops_at_the_decay_and_biases_freeze_for_the_last_steps():
    optim = OptimConfig(schedule="wsd", warmup_steps=5, decay_fraction=0.2)
    train = TrainConfig(steps=100, mtp_loss_weight_at_decay=0.1, router_bias_freeze_fraction=0.1)
    phases = PhaseSchedules(train, optim, 0.3, mtp=True)
    assert [phases.mtp_loss_weight(s) for s in (0, 79, 80, 99)] == [0.3, 0.3, 0.1, 0.1]
    assert [phases.updates_router_biases(s) for s in (0, 89, 90, 99)] == [True, True, False, False]
    assert phases.metrics(95) == {"mtp_loss_weight": 0.1, "router_biases_moving": 0.0}
    kept = TrainConfig(steps=100, mtp_loss_weight_at_decay=None)
    assert PhaseSchedules(kept, optim, 0.3, mtp=True).mtp_loss_weight(99) == 0.3
    assert PhaseSchedules(kept, optim, 0.3, mtp=False).metrics(99) == {}


def test_the_loss_uses_the_weight_set_on_the_model():
    """L(w) = main + w x MTP + aux: (L(0.3) - L(0.1)) / (L(0.3) - L(0)) = 2/3."""
    torch.manual_seed(0)
    model = build_model(small_model(vocab_size=64, mtp=MTPConfig(depth=1, loss_weight=0.3)))
    tokens = torch.randint(0, 64, (2, 9))
    losses = {}
    for weight in (0.3, 0.1, 0.0):
        model.mtp_loss_weight = weight
        losses[weight] = model(tokens[:, :-1], tokens[:, 1:]).item()
    ratio = (losses[0.3] - losses[0.1]) / (losses[0.3] - losses[0.0])
    assert ratio == pytest.approx(2 / 3, rel=1e-4)


def biases(run_dir) -> dict[str, torch.Tensor]:
    """The router biases of the run's final checkpoint."""
    (step,) = sorted((run_dir / "checkpoints").glob("step-*"))
    names = [name for name in tensor_metadata(step) if name.endswith("router.bias")]
    return read_tensors(step, names)


def test_frozen_router_biases_stay_where_the_last_moving_step_left_them(tmp_path):
    """A constant LR (no warmup) gives steps 1-2 the same updates in a 2-step and a 4-step run;
    with the last half of the 4 steps frozen its biases end where the 2-step run's do, while
    the other parameters keep training; the metric says which steps moved them."""
    common = ["optim.schedule=constant", "optim.warmup_steps=0", "train.eval_every=0"]
    train_in_process(tmp_path / "two", [*common, "train.steps=2"])
    frozen = [*common, "train.steps=4", "train.router_bias_freeze_fraction=0.5"]
    train_in_process(tmp_path / "four", frozen)
    two, four = biases(tmp_path / "two"), biases(tmp_path / "four")
    assert two and two.keys() == four.keys()
    for name, bias in two.items():
        torch.testing.assert_close(four[name], bias, rtol=0, atol=0)
    assert sum(bias.abs().sum() for bias in two.values()) > 0  # they moved in steps 1-2 (a
    # hash-routed layer's never moves)
    moving = [r["router_biases_moving"] for r in read_metrics(tmp_path / "four")[0]]
    assert moving == [1.0, 1.0, 0.0, 0.0]
