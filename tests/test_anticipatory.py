"""Anticipatory Routing: the experts used at step t are those an independent forward with the
parameters of step t - dt chooses; switched on by a spike; exact resume inside its window."""

from __future__ import annotations

import copy

import pytest
import torch
from test_parallel import MODEL
from test_spikes import SPIKE, trainer_of
from test_train import read_metrics, train_in_process

from birkhoff.checkpoint.contents import read_tensors, tensor_metadata
from birkhoff.launch.recipe import typed_recipe
from birkhoff.model import build_model
from birkhoff.model.moe import Router
from birkhoff.parallel import distributed
from conftest import SMALL_OVERRIDES, compose_recipe

LOOKAHEAD = 2


def routed_experts(model: torch.nn.Module, only_training: bool) -> tuple[list, list]:
    """Hooks that keep every router's chosen experts (per call) and the model's inputs."""
    experts, inputs = [], []

    def keep_experts(module, args, output):
        if module.training or not only_training:
            experts.append(output[1].clone())

    def keep_inputs(module, args, kwargs):
        if module.training or not only_training:
            inputs.append((args, kwargs))

    for module in model.modules():
        if isinstance(module, Router):
            module.register_forward_hook(keep_experts)
    model.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    return experts, inputs


def test_the_experts_of_step_t_are_those_of_the_parameters_of_step_t_minus_dt():
    overrides = ["train.steps=7", "train.eval_every=0", "train.anticipatory.mode=always",
                 f"train.anticipatory.lookahead={LOOKAHEAD}"]  # fmt: skip
    with distributed(torch.device("cpu"), {}) as ctx:
        trainer = trainer_of(overrides, ctx)
        independent = copy.deepcopy(trainer.model).eval()
        used, trained_on = routed_experts(trainer.model, only_training=True)
        chosen, _ = routed_experts(independent, only_training=False)
        parameters, experts, batches = {}, {}, {}
        for step in range(1, 8):
            parameters[step] = copy.deepcopy(trainer.model.state_dict())  # those of step t
            used.clear()
            trained_on.clear()
            trainer.train_step()
            experts[step], batches[step] = list(used), trained_on[0]

    def independent_choice(parameters_of: int, step: int) -> list[torch.Tensor]:
        independent.load_state_dict(parameters[parameters_of])
        chosen.clear()
        args, kwargs = batches[step]
        with torch.no_grad():
            independent(*args, **kwargs)
        return list(chosen)

    changed = 0
    for step in range(1, 8):
        source = step - LOOKAHEAD if step > LOOKAHEAD else step  # the first dt route as usual
        expected = independent_choice(source, step)
        assert len(expected) == len(experts[step]) > 0
        assert all(torch.equal(a, b) for a, b in zip(expected, experts[step], strict=True)), step
        if source != step:
            own = independent_choice(step, step)
            changed += sum(int((a != b).any(-1).sum()) for a, b in zip(own, expected, strict=True))
    assert changed > 0  # the stale parameters chose other experts for some tokens


def test_the_look_ahead_forward_routes_every_moe_layer_without_the_head():
    """`routes_only` (the look-ahead's forward): the experts of every MoE layer, the MTP
    depth's included, are those of a full forward, and the head's loss never runs."""
    recipe = typed_recipe(compose_recipe([*SMALL_OVERRIDES, *MODEL]))
    assert recipe.model.mtp.depth == 1
    model = build_model(recipe.model, seed=0).eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, recipe.data.seq_len + 1))
    chosen, _ = routed_experts(model, only_training=False)
    head_calls = []
    linear_loss = model._linear_loss
    model._linear_loss = lambda *args: head_calls.append(1) or linear_loss(*args)
    with torch.no_grad():
        model(tokens[:, :-1], tokens[:, 1:])
        full, chosen[:] = list(chosen), []
        assert len(head_calls) == 2  # the main head and the MTP depth's
        out = model(tokens[:, :-1], tokens[:, 1:], routes_only=True)
    assert len(head_calls) == 2 and out.item() == 0.0
    with pytest.raises(ValueError, match="routes_only"):  # no targets: nothing to route MTP on
        model(tokens[:, :-1], routes_only=True)
    layers = sum(isinstance(m, Router) for m in model.modules())
    assert len(chosen) == len(full) == layers
    assert all(torch.equal(a, b) for a, b in zip(full, chosen, strict=True))


@pytest.fixture(scope="module")
def spiked_with_routing(tmp_path_factory):
    """The spike of test_spikes, now switching Anticipatory Routing on for 6 steps."""
    run = tmp_path_factory.mktemp("routed")
    overrides = ["train.steps=20", "checkpoint.every=13", *SPIKE,
                 "train.anticipatory.mode=spike", "train.anticipatory.steps=6",
                 f"train.anticipatory.lookahead={LOOKAHEAD}"]  # fmt: skip
    train_in_process(run, overrides)
    return run, overrides


def test_a_rollback_switches_it_on_for_its_window(spiked_with_routing):
    """Look-ahead forwards at steps 11-16 (the window); plans from step 13 (11 and 12 had
    none yet) until the queue has drained (step 18)."""
    run, _ = spiked_with_routing
    records, _ = read_metrics(run)
    applied = [r for r in records if not r.get("skipped")]
    planned = [r["step"] for r in applied if r["anticipatory_routing"]]
    assert planned == list(range(13, 19))
    looked_ahead = [r["step"] for r in applied if r["anticipatory_s"] > 0]
    assert looked_ahead == list(range(11, 17))


def test_resuming_inside_the_window_gives_the_same_run(spiked_with_routing, tmp_path):
    run, overrides = spiked_with_routing
    step13 = run / "checkpoints" / "step-00000013"
    train_in_process(tmp_path, [*overrides, f"train.resume={step13}"])
    final = [run / "checkpoints" / "step-00000020", tmp_path / "checkpoints" / "step-00000020"]
    names = [n for n in tensor_metadata(final[0]) if n.startswith("model.")]
    first, second = (read_tensors(path, names) for path in final)
    assert all(first[n].equal(second[n]) for n in names)
    resumed, _ = read_metrics(tmp_path)
    assert [r["step"] for r in resumed if r["anticipatory_routing"]] == list(range(14, 19))
