import itertools

import pytest
import torch

from birkhoff.model import build_model
from birkhoff.model.config import ResidualConfig
from birkhoff.train import optim
from birkhoff.train.adamw import AdamW
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


# Row-sparse Engram table updates (optim.engram_update=sparse): the lazy AdamW row update.
def _sparse_steps(optimizer, param, draws) -> None:
    for rows, target in draws:
        out = torch.nn.functional.embedding(rows, param, sparse=True)
        ((out - target) ** 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def _draws(rows: int, width: int, lookups: int, steps: int, every_row: bool = False):
    generator = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(steps):
        looked_up = torch.randint(0, rows, (lookups,), generator=generator)
        if every_row:  # every row at least once, some twice (duplicates sum)
            looked_up = torch.cat([torch.randperm(rows, generator=generator), looked_up])
        target = torch.randn(looked_up.numel(), width, generator=generator, dtype=torch.float64)
        draws.append((looked_up, target))
    return draws


def test_sparse_row_loss_and_grad_as_torchs_sparse_adam():
    """torch.optim.SparseAdam is lazy Adam too; with eps -> 0 its (sqrt(v) + eps) and AdamW's
    (sqrt(v / bc2) + eps) denominators agree, so both must give the same rows."""
    start = torch.randn(40, 3, dtype=torch.float64)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    draws = _draws(40, 3, lookups=25, steps=6)
    _sparse_steps(
        AdamW([ours], lr=0.05, betas=(0.9, 0.95), eps=1e-30, weight_decay=0.0), ours, draws
    )
    reference = torch.optim.SparseAdam([theirs], lr=0.05, betas=(0.9, 0.95), eps=1e-30)
    _sparse_steps(reference, theirs, draws)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert (ours - start).abs().max() > 0.1  # the rows did move


def test_rows_looked_up_every_step_move_exactly_as_dense_adamw():
    start = torch.randn(30, 4, dtype=torch.float64)
    sparse, dense = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    draws = _draws(30, 4, lookups=20, steps=5, every_row=True)
    settings = {"lr": 0.02, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    ours = AdamW([sparse], **settings)
    _sparse_steps(ours, sparse, draws)
    reference = torch.optim.AdamW([dense], **settings)
    for rows, target in draws:
        out = torch.nn.functional.embedding(rows, dense)
        ((out - target) ** 2).sum().backward()
        reference.step()
        reference.zero_grad()
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    for key in ("step", "exp_avg", "exp_avg_sq"):  # AdamW's own state: checkpoints agree
        torch.testing.assert_close(ours.state[sparse][key], reference.state[dense][key])


def test_rows_not_looked_up_keep_their_values_and_moments():
    start = torch.randn(20, 2, dtype=torch.float64)
    param = torch.nn.Parameter(start.clone())
    optimizer = AdamW([param], lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    first, second = torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4])
    draws = [(first, torch.randn(4, 2, dtype=torch.float64))]
    _sparse_steps(optimizer, param, draws)
    moments = {k: optimizer.state[param][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    after_first = param.detach().clone()
    _sparse_steps(optimizer, param, [(second, torch.randn(3, 2, dtype=torch.float64))])
    untouched = torch.tensor([0, 1, *range(5, 20)])
    assert torch.equal(param[untouched], after_first[untouched])
    assert torch.equal(param[5:], start[5:])
    for key, before in moments.items():
        assert torch.equal(optimizer.state[param][key][untouched], before[untouched])
    assert not torch.equal(param[second], after_first[second])
    assert optimizer.state[param]["step"].item() == 2


EXEMPT = {"embedding.weight"}  # AdamW's decay on matrices only leaves these (and 1-D ones)
MHC_BIASES = ("bias_pre", "bias_post", "bias_res")


@pytest.mark.parametrize("decay_all", [False, True])
def test_v4_decays_what_adamw_trains_but_the_engram_tables(decay_all):
    """optim.decay_all_adamw (muon_v4.yaml: V4's AdamW with wd 0.1 for the embedding, head,
    norms, mHC biases and gains): on a zero gradient AdamW moves nothing, so one step leaves
    each parameter it trains at p x (1 - lr x wd) where it decays (lr: its group's, in warm-up)
    and at p where it does not; the Engram tables never decay."""
    from birkhoff.model.config import EngramConfig
    from birkhoff.model.engram import Engram
    from birkhoff.model.matrices import weight_matrices

    model = build_model(small_model(engram=EngramConfig(layers=[1], table_size=50)))
    cfg = OptimConfig(name="muon_v4", lr=0.01, weight_decay=0.1, decay_all_adamw=decay_all)
    optimizer, _ = build_optimizer(model, cfg, 10)
    matrices = {id(p) for p in weight_matrices(model)}
    tables = {id(m.table.weight) for m in model.modules() if isinstance(m, Engram)}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for param in model.parameters():  # Muon's matrices left out: no gradient, no step
        param.grad = None if id(param) in matrices else torch.zeros_like(param)
    optimizer.step()
    names = {id(p): name for name, p in model.named_parameters()}
    checked = {"table": 0, "decayed": 0, "kept": 0}
    for param in model.parameters():
        name = names[id(param)]
        if id(param) in matrices:
            continue
        if id(param) in tables:
            expected, kind = before[name], "table"
        elif decay_all or not (param.dim() < 2 or name in EXEMPT or name.endswith(MHC_BIASES)):
            expected, kind = before[name] * (1 - lr[id(param)] * 0.1), "decayed"
        else:
            expected, kind = before[name], "kept"
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=0, msg=name)
        checked[kind] += 1
    assert checked["table"] == 1 and checked["decayed"] > 0
    assert (checked["kept"] == 0) == decay_all


@pytest.mark.parametrize("name", ["adamw", "muon_v4"])
def test_on_a_cpu_adamw_steps_fused_and_moves_as_the_loop_per_tensor(name, monkeypatch):
    """build_optimizer takes AdamW's fused step where every parameter is on a CPU or CUDA
    device; six steps with the same gradients move the parameters as torch's loop over the
    tensors does (a second implementation) to float32 rounding. On `meta` (the planner's
    models) it keeps torch's default. (Trained on their own gradients the two drift apart
    from the second step: AdamW's first updates are +-lr whatever a gradient's size.)"""
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.1, warmup_steps=0)
    kind_here = optim.adamw_step_kind
    with torch.device("meta"):
        assert build_optimizer(build_model(small_model()), cfg, 10)[0].defaults["fused"] is None
    trained = {}
    for fused in (True, None):
        kind = {"fused": True} if fused else {}
        monkeypatch.setattr(optim, "adamw_step_kind", lambda model, kind=kind: kind)
        torch.manual_seed(0)
        model = build_model(small_model(vocab_size=64))
        optimizer, _ = build_optimizer(model, cfg, 10)
        assert optimizer.defaults["fused"] is fused
        generator = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        trained[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert kind_here(model) == {"fused": True}
    torch.testing.assert_close(trained[True], trained[None], rtol=1e-6, atol=1e-7)


def test_dtensors_mixed_with_plain_parameters_step_with_the_loop_per_tensor():
    """Tensor parallelism leaves some parameters plain tensors: AdamW then loops per tensor
    (fused and foreach refuse a mix of DTensors and tensors) and its step runs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist = torch.distributed
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = torch.nn.Linear(4, 4)
        weight = distribute_tensor(model.weight.detach(), mesh, [Replicate()])
        model.weight = torch.nn.Parameter(weight)
        assert optim.adamw_step_kind(model) == {"foreach": False}
        optimizer, _ = build_optimizer(model, OptimConfig(lr=1e-2), 10)
        model.weight.grad = distribute_tensor(torch.randn(4, 4), mesh, [Replicate()])
        model.bias.grad = torch.randn(4)
        before = model.bias.detach().clone()
        optimizer.step()
        assert not torch.equal(model.bias.detach(), before)
    finally:
        dist.destroy_process_group()
