"""The optimizer a recipe names (AdamW, or Muon with AdamW: train/muon.py), its parameter
groups and its LR scheduler."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from birkhoff.model.engram import Engram
from birkhoff.model.matrices import balanced_tables, weight_matrices
from birkhoff.train.adamw import AdamW
from birkhoff.train.config import OptimConfig
from birkhoff.train.muon import MuonV4
from birkhoff.train.schedule import lr_multiplier


def _exempt_from_decay(model: nn.Module) -> set[int]:
    """Embeddings (and a head tied to them), plus what modules list in `no_weight_decay`
    (e.g. the static mHC biases, which are matrices but not weights)."""
    exempt = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            exempt.add(id(module.weight))
        for name in getattr(module, "no_weight_decay", ()):
            exempt.add(id(getattr(module, name)))
    return exempt


def param_groups(model: nn.Module, weight_decay: float, lr: float) -> list[dict]:
    """Decay matrices only: norms, biases, embeddings and declared exemptions are not decayed.
    Engram tables form their own group: LR x their multiplier, no weight decay."""
    exempt_ids = _exempt_from_decay(model)
    engram_tables = {id(m.table.weight): m for m in model.modules() if isinstance(m, Engram)}
    decay, no_decay, tables = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in engram_tables:
            tables.append(param)
            continue
        exempt = param.dim() < 2 or id(param) in exempt_ids
        (no_decay if exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if tables:
        multiplier = next(iter(engram_tables.values())).lr_multiplier
        groups.append(
            {"params": tables, "weight_decay": 0.0, "lr": lr * multiplier, "name": "engram_tables"}
        )
    return groups


def muon_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW's groups with the matrices Muon trains taken out into a `muon` group (they all
    come from `decay`: Muon's weight decay is decoupled the same way)."""
    groups = param_groups(model, cfg.weight_decay, cfg.lr)
    matrices = {id(p) for p in weight_matrices(model)}
    decay = groups[0]
    muon = [p for p in decay["params"] if id(p) in matrices]
    decay["params"] = [p for p in decay["params"] if id(p) not in matrices]
    settings = {"momentum": cfg.muon_momentum, "update_rms": cfg.muon_update_rms}
    group = {"params": muon, "weight_decay": cfg.weight_decay, "muon": True, **settings}
    return [{**group, "name": "muon"}, *groups]


def with_balanced_tables(groups: list[dict], model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """optim.embedding_update=sinkhorn: the tables move from their groups into `sinkhorn`
    groups of the same learning rate (Engram's multiplier kept), without weight decay."""
    if cfg.embedding_update != "sinkhorn":
        return groups
    tables = {id(p) for p in balanced_tables(model)}
    settings = {"momentum": cfg.sinkhorn_momentum, "update_rms": cfg.sinkhorn_update_rms}
    balanced = []
    for group in groups:
        moved = [p for p in group["params"] if id(p) in tables]
        group["params"] = [p for p in group["params"] if id(p) not in tables]
        if moved:
            name, lr = f"sinkhorn_{group['name']}", group.get("lr", cfg.lr)
            balanced.append({"params": moved, "weight_decay": 0.0, "lr": lr, "name": name,
                             "sinkhorn": True, **settings})  # fmt: skip
    return groups + balanced  # groups left empty are dropped by build_optimizer


def optimizer_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The parameter groups build_optimizer gives its optimizer: `muon` ones (optim=muon_v4)
    and `sinkhorn` ones (optim.embedding_update=sinkhorn) keep one buffer per element, the
    rest AdamW's two."""
    if cfg.name == "muon_v4":
        groups = muon_param_groups(model, cfg)
    else:
        groups = param_groups(model, cfg.weight_decay, cfg.lr)
    if cfg.decay_all_adamw:  # V4: AdamW's embeddings, norms, biases and gains decay too
        next(g for g in groups if g["name"] == "no_decay")["weight_decay"] = cfg.weight_decay
    groups = with_balanced_tables(groups, model, cfg)
    # No empty groups: the tables may have emptied theirs (with_balanced_tables), and a
    # pipeline stage may hold none of a group's parameters (the first stage's matrices all go
    # to Muon, the head being on the last stage); DCP cannot load an empty group's state.
    return [group for group in groups if group["params"]]


# Where AdamW's fused kernel exists: torch ships it for CPUs and CUDA; torch_npu registers
# `_fused_adamw_` for Ascend devices (its wheel's aten/ops/_fused_adamw_npu_dispatch.h) and
# torch takes its privateuse1 backend ("npu") among the fused optimizers' devices.
FUSED_DEVICES = ("cpu", "cuda", "npu")


def adamw_step_kind(model: nn.Module) -> dict[str, bool]:
    """How AdamW steps `model`'s parameters: fused (one kernel over every tensor of a device
    and dtype) where they all lie on a device torch ships it for and all or none are
    DTensors; the loop per tensor where DTensors and plain tensors mix (tensor parallelism
    leaves some parameters whole: the fused and foreach kernels refuse the mix, and foreach
    is torch's default on accelerators); else torch's default ({}). On a CPU the loop took
    3.3x the fused step's time (200M parameters: 404-556 against 125-129 ms)."""
    params = list(model.parameters())
    kinds = {isinstance(p, DTensor) for p in params}
    if len(kinds) > 1:
        return {"foreach": False}
    devices = {p.device.type for p in params}
    return {"fused": True} if devices and devices <= set(FUSED_DEVICES) else {}


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """optim.name: adamw (every parameter), or muon_v4 (Muon for the matrices, AdamW for the
    rest, one learning rate and schedule for both)."""
    settings = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    settings.update(adamw_step_kind(model))
    groups = optimizer_groups(model, cfg)
    optimizer = (MuonV4 if cfg.name == "muon_v4" else AdamW)(groups, **settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))
    return optimizer, scheduler
