"""AdamW with parameter groups and its LR scheduler.

Engram tables may train with row-sparse gradients (optim.engram_update=sparse): their step
then costs what the step's rows cost, not what the table holds. Such a parameter gets the
lazy AdamW update: a row looked up this step moves exactly as AdamW would move it (same step
count, bias corrections and eps); a row not looked up keeps its value and its moments, where
dense AdamW would still decay the moments and move the row along its old momentum. Tables
have no weight decay, so decoupled decay (applied to the touched rows only) does not arise.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from birkhoff.model.engram import Engram
from birkhoff.train.config import OptimConfig
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


class AdamW(torch.optim.AdamW):
    """torch's AdamW for dense gradients; the lazy row update for sparse (COO) ones. The
    state of either kind is AdamW's own (step, exp_avg, exp_avg_sq), so checkpoints do not
    depend on which ran."""

    @torch.no_grad()
    def step(self, closure=None):  # torch's signature
        sparse = [
            (group, p)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and p.grad.is_sparse
        ]
        grads = {p: p.grad for _, p in sparse}
        for p in grads:
            p.grad = None  # torch's AdamW refuses sparse gradients
        try:
            loss = super().step(closure)
        finally:
            for p, grad in grads.items():
                p.grad = grad
        for group, p in sparse:
            self._row_update(group, p, grads[p].coalesce())
        return loss

    def _row_update(self, group: dict, param: torch.Tensor, grad: torch.Tensor) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        step = state["step"].item()
        beta1, beta2 = group["betas"]
        lr, eps, decay = float(group["lr"]), group["eps"], group["weight_decay"]
        rows, values = grad.indices()[0], grad.values()
        exp_avg = state["exp_avg"][rows].mul_(beta1).add_(values, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        updated = param[rows].mul_(1 - lr * decay)
        updated.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        param.index_copy_(0, rows, updated)


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = AdamW(
        param_groups(model, cfg.weight_decay, cfg.lr),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))
    return optimizer, scheduler
