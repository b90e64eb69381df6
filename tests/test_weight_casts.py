"""train.weight_casts: bf16 weight copies made once a step (per_step) train the same bits as
autocast's per-micro-batch casts (the independent route: the trainer as it ran before), and
each weight is cast once a step instead of once a micro-batch (counted at the dispatcher)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from birkhoff.data import open_data
from birkhoff.errors import RecipeError
from birkhoff.kernels.moved_bytes import MovedBytes
from birkhoff.launch.recipe import load_recipe
from birkhoff.model.step_casts import StepCasts
from birkhoff.parallel import distributed
from birkhoff.parallel.planning.cluster import cluster_from
from birkhoff.parallel.planning.estimate import GIB, estimate
from birkhoff.parallel.planning.inventory import build_inventory
from birkhoff.parallel.planning.layout import Layout, Workload
from birkhoff.parallel.planning.traffic import cast_weights
from birkhoff.train.metrics import MetricLogger
from birkhoff.train.trainer import Trainer
from birkhoff.train.weight_casts import casts_kept_for_step, resolve_weight_casts, step_casts_of
from conftest import SMALL_OVERRIDES, compose_recipe

MICRO_BATCHES = 4
PRESETS_H100 = cluster_from({"preset": "h100", "devices": 1})  # the plan's bytes, not times
BF16 = [
    "train.mixed_precision=bf16",
    "train.micro_batch_size=2",  # 8 sequences: 4 micro-batches
    "model.mtp.depth=1",  # the head's weight serves two losses
    "train.eval_every=0",
]


class WeightCasts(TorchDispatchMode):
    """Counts the casts whose input is one of `params` (by storage), and their bytes."""

    def __init__(self, params: dict[int, str], expert_shapes: set[torch.Size]) -> None:
        super().__init__()
        self.params = params
        self.expert_shapes = expert_shapes
        self.casts: Counter[str] = Counter()
        self.bytes = 0
        self.gradient_casts = 0  # bf16 to float32 casts of tensors shaped as routed experts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if func is torch.ops.aten._to_copy.default and isinstance(source, torch.Tensor):
            name = self.params.get(source.untyped_storage().data_ptr())
            if name is not None and out.dtype == torch.bfloat16:
                self.casts[name] += 1
                self.bytes += source.nbytes + out.nbytes
            stacked = source.shape in self.expert_shapes and source.dtype == torch.bfloat16
            if stacked and out.dtype == torch.float32 and name is None:
                self.gradient_casts += 1
        return out


def _trainer(ctx, overrides: list[str]) -> Trainer:
    recipe = _recipe(BF16 + overrides, world=1)
    return Trainer(recipe, open_data(recipe.data), ctx, torch.device("cpu"), MetricLogger([]))


def _one_step(mode: str, checkpoint: str) -> tuple[Trainer, WeightCasts, torch.Tensor]:
    overrides = [f"train.weight_casts={mode}", f"parallel.activation_checkpoint={checkpoint}"]
    with distributed(torch.device("cpu"), {}) as ctx:
        trainer = _trainer(ctx, overrides)
        assert trainer.weight_casts == mode and trainer.grad_accum == MICRO_BATCHES
        micro_batches = trainer.routing.next_batch(trainer)
        params = {p.untyped_storage().data_ptr(): n for n, p in trainer.model.named_parameters()}
        shapes = {p.shape for n, p in trainer.model.named_parameters() if ".experts." in n}
        with WeightCasts(params, shapes) as counted, MovedBytes() as moved:
            loss_sum = trainer.forward_backward(micro_batches)
    counted.moved = moved.by_name["aten._to_copy"] + moved.by_name.get("aten.add_", 0)
    return trainer, counted, loss_sum


@pytest.mark.parametrize("checkpoint", ["none", "full"])
def test_per_step_casts_give_the_per_micro_batch_gradients_bit_for_bit(checkpoint):
    kept, kept_casts, kept_loss = _one_step("per_step", checkpoint)
    each, each_casts, each_loss = _one_step("per_micro_batch", checkpoint)
    assert torch.equal(kept_loss, each_loss)
    each_grads = dict(each.model.named_parameters())
    for name, param in kept.model.named_parameters():
        other = each_grads[name].grad
        assert (param.grad is None) == (other is None), name
        assert param.grad is None or torch.equal(param.grad, other), name
    # every weight a matmul casts: once a step, where autocast alone casts it in every
    # micro-batch's forward (and again in each recomputation)
    assert set(kept_casts.casts) == set(each_casts.casts)
    assert any("experts" in n for n in kept_casts.casts), "the grouped experts' own casts"
    assert any("attention" in n or "attn" in n for n in kept_casts.casts), "nn.Linear's"
    assert set(kept_casts.casts.values()) == {1}
    passes = MICRO_BATCHES * (2 if checkpoint == "full" else 1)
    recomputed = {n for n in each_casts.casts if "_checkpoint_wrapped_module" in n}
    for name, count in each_casts.casts.items():
        assert count == (passes if name in recomputed else MICRO_BATCHES), (name, count)
    # the routed experts' gradients: summed in their casts, one cast to float32 a step
    # (the first micro-batch's), where autograd casts every micro-batch's
    experts = [n for n in kept_casts.casts if n.endswith(("w_gate", "w_up", "w_down"))]
    assert kept_casts.gradient_casts == len(experts)
    assert each_casts.gradient_casts == MICRO_BATCHES * len(experts)
    weights = {n: p for n, p in kept.model.named_parameters() if n in kept_casts.casts}
    elements = sum(p.numel() for p in weights.values())
    assert kept_casts.bytes == 6 * elements
    # the plan's cast weights (traffic.py) also take mHC's and the routers' small matrices,
    # which run in float32: a few percent above what is cast
    inv = build_inventory(kept.model_cfg)
    planned = cast_weights(inv.groups, Layout())
    assert elements < planned < 1.1 * elements
    if checkpoint == "none":  # the plan's casts and gradient sums, per_step's saving
        work = Workload(global_batch=8, seq_len=64, kernels="reference")
        plan = {
            m: estimate(
                inv, Layout(micro_batch=2), replace(work, weight_casts=m), PRESETS_H100
            ).traffic_gib
            for m in ("auto", "per_micro_batch")
        }
        saving = [(t["casts"] + t["gradients"]) * GIB for t in plan.values()]
        # counted: autocast's casts of activations cancel; the weights' casts and sums remain
        counted_saving = each_casts.moved - kept_casts.moved
        assert counted_saving == pytest.approx(saving[1] - saving[0], rel=0.05)


def _recipe(overrides: list[str], world: int):
    ranks = [f"launch.nproc_per_node={world}", "train.micro_batch_size=2"]
    recipe, _ = load_recipe(compose_recipe(SMALL_OVERRIDES + ranks + overrides), env={})
    return recipe


@pytest.mark.parametrize(
    "overrides, world, expected",
    [
        (["train.mixed_precision=bf16"], 1, "per_step"),
        (["train.mixed_precision=none"], 1, "per_micro_batch"),
        (["train.mixed_precision=bf16", "parallel.dp_replicate=2", "parallel.dp_shard=1"], 2,
         "per_step"),
        (["train.mixed_precision=bf16", "parallel.dp_shard=2"], 2, "per_micro_batch"),
        (["train.mixed_precision=bf16", "train.weight_casts=per_micro_batch"], 1,
         "per_micro_batch"),
    ],
)  # fmt: skip
def test_auto_keeps_the_casts_unless_fsdp_gathers_the_weights(overrides, world, expected):
    recipe = _recipe(overrides, world)
    assert resolve_weight_casts(recipe.train, recipe.parallel, world) == expected


@pytest.mark.parametrize(
    "overrides, world, fix",
    [
        (["train.mixed_precision=none"], 1, "train.mixed_precision=bf16"),
        (["train.mixed_precision=bf16", "parallel.dp_shard=2"], 2, "param_dtype=bfloat16"),
    ],
)
def test_an_explicit_per_step_that_cannot_apply_is_refused(overrides, world, fix):
    """Refused where the recipe is validated, before any work."""
    with pytest.raises(RecipeError) as raised:
        _recipe([*overrides, "train.weight_casts=per_step"], world)
    assert raised.value.key == "train.weight_casts" and fix in str(raised.value)


def test_a_kept_cast_sums_its_micro_batches_gradients_and_hands_them_on_with_the_last():
    """Three backwards through one kept cast: no gradient until the third, then the sum of
    the three bf16 gradients in float32 (an independent sum of each one's exact value)."""
    weight = torch.randn(4, 3, requires_grad=True)
    casts = StepCasts()
    casts.open(3)
    scales = [torch.randn(4, 3) for _ in range(3)]
    expected = torch.zeros(4, 3, dtype=torch.float64)
    for index, scale in enumerate(scales):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (cast,) = casts.get(torch.bfloat16, (weight,))
            (cast * scale.bfloat16()).float().sum().backward()
        expected += scale.bfloat16().double()
        assert (weight.grad is None) == (index < 2)
    assert casts.close() == 0
    assert weight.grad.dtype == torch.float32
    assert torch.equal(weight.grad, expected.float())


def test_a_step_that_runs_fewer_backwards_than_it_said_fails_loudly():
    """Gradients summed in a cast but never handed on would be lost: the step fails."""
    module = torch.nn.Module()
    module.step_casts = StepCasts()
    weight = torch.randn(2, 2, requires_grad=True)
    failing = pytest.raises(RuntimeError, match="not handed to autograd")
    with failing, casts_kept_for_step(step_casts_of([module]), "cpu", micro_batches=2):
        (cast,) = module.step_casts.get(torch.bfloat16, (weight,))
        cast.float().sum().backward()
    assert weight.grad is None and module.step_casts.kept is None


def test_without_summing_a_kept_cast_leaves_each_gradient_to_autograd():
    """A zero-bubble pipeline asks autograd for each micro-batch's weight gradients: there
    the kept cast is autograd's own, every backward's gradient reaching the weight."""
    weight = torch.randn(3, requires_grad=True)
    casts = StepCasts()
    casts.open(2, summing=False)
    for done in (1, 2):
        (cast,) = casts.get(torch.bfloat16, (weight,))
        cast.float().sum().backward()
        assert torch.equal(weight.grad, torch.full((3,), float(done)))
    assert casts.close() == 0


def test_a_compiled_block_casts_in_its_graph_without_breaking_it():
    """train.compile: dynamo traces the block whole (a kept cast broke its graph 22 times at
    `tiny`) and the cast is the graph's own, nothing kept from it."""
    weight = torch.randn(4, 4, requires_grad=True)
    casts = StepCasts()
    casts.open(2)

    def block(x: torch.Tensor) -> torch.Tensor:
        (cast,) = casts.get(torch.bfloat16, (weight,))
        return (x.bfloat16() @ cast).float()

    compiled = torch.compile(block, backend="eager", fullgraph=True)
    out = compiled(torch.randn(2, 4))
    out.sum().backward()
    assert casts.kept == {} and weight.grad is not None
    assert casts.close() == 0
