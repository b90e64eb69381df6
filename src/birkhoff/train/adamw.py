"""AdamW, with a lazy row update for row-sparse gradients.

Engram tables may train with row-sparse gradients (optim.engram_update=sparse): their step
then costs what the step's rows cost, not what the table holds. Such a parameter gets the
lazy AdamW update: a row looked up this step moves exactly as AdamW would move it (same step
count, bias corrections and eps); a row not looked up keeps its value and its moments, where
dense AdamW would still decay the moments and move the row along its old momentum. Tables
have no weight decay, so decoupled decay (applied to the touched rows only) does not arise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from birkhoff.train.sinkhorn_update import sinkhorn_step


@contextmanager
def hidden_gradients(params: list[torch.Tensor]) -> Iterator[None]:
    """Within the block the parameters have no gradient (torch's optimizers skip them); after
    it they have theirs back. How one optimizer hands some parameters to another update."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad


class AdamW(torch.optim.AdamW):
    """torch's AdamW for dense gradients; the lazy row update for sparse (COO) ones. The
    state of either kind is AdamW's own (step, exp_avg, exp_avg_sq), so checkpoints do not
    depend on which ran. Groups marked `sinkhorn` (lr, momentum, update_rms) take V4.1's
    Sinkhorn-balanced update instead (train/sinkhorn_update.py)."""

    @torch.no_grad()
    def step(self, closure=None):  # torch's signature
        sparse = [
            (group, p)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and p.grad.is_sparse and not group.get("sinkhorn")
        ]
        balanced = [g for g in self.param_groups if g.get("sinkhorn")]
        hidden = [p for _, p in sparse] + [p for g in balanced for p in g["params"]]
        with hidden_gradients(hidden):  # torch's AdamW refuses sparse ones
            loss = super().step(closure)
        for group, p in sparse:
            self._row_update(group, p, p.grad.coalesce())
        for group in balanced:
            for p in group["params"]:
                if p.grad is not None:
                    sinkhorn_step(p, self.state[p], group)
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
