"""Muon as DeepSeek-V4 trains its matrices (report §2.4), with AdamW for everything else.

For a matrix W with gradient G (routed experts: each expert's matrix on its own):
    M_t = mu M_{t-1} + G_t                      (momentum 0.95)
    O'  = HybridNS(mu M_t + G_t)                (Nesterov)
    O   = O' sqrt(max(n, m)) gamma              (update RMS gamma = 0.18)
    W  <- W (1 - lr wd) - lr O                  (decoupled weight decay 0.1)
HybridNS: X = M / ||M||_F (the wide orientation), 8 quintic Newton-Schulz iterations with
(3.4445, -4.7750, 2.0315), which push every singular value into roughly [0.7, 1.2] fast,
then 2 with (2, -1.5, 0.5), which pull them to 1: X <- a X + (b A + c A^2) X, A = X X^T.
Float32 throughout (torch.optim.Muon iterates in bfloat16).

Against torch.optim.Muon (torch 2.13): its momentum is an EMA (buf.lerp_(G, 1 - mu), the
Nesterov input G.lerp(buf, mu)): (1 - mu) times V4's, which the Frobenius normalisation
removes; it runs one coefficient set for all iterations (no hybrid), 2-D matrices only, and
scales by 0.2 sqrt(max(n, m)) with adjust_lr_fn="match_rms_adamw" (V4: 0.18).

Sharded matrices (FSDP, tp, ep: DTensors) are orthogonalised whole: the update a rank applies
is the slice of the one computed on the full matrix, the same as one process's.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from birkhoff.train.adamw import AdamW, hidden_gradients

QUINTIC = (3.4445, -4.7750, 2.0315)
CUBIC = (2.0, -1.5, 0.5)
V4_SCHEDULE = ((QUINTIC, 8), (CUBIC, 2))


def hybrid_newton_schulz(
    matrices: torch.Tensor, schedule=V4_SCHEDULE, eps: float = 1e-7
) -> torch.Tensor:
    """(..., n, m) -> the same shape: each matrix's orthogonal polar factor, approximately
    (see the module docstring), in float32."""
    x = matrices.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp_min(eps)
    for (a, b, c), iterations in schedule:
        for _ in range(iterations):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class MuonV4(AdamW):
    """Muon for the parameter groups marked `muon` (lr, weight_decay, momentum, update_rms),
    AdamW (with its sparse-row update) for the others; one optimizer, one state dict."""

    def __init__(self, params, schedule=V4_SCHEDULE, **adamw) -> None:  # torch's signature
        super().__init__(params, **adamw)
        self.schedule = schedule

    @torch.no_grad()
    def step(self, closure=None):  # torch's signature
        groups = [g for g in self.param_groups if g.get("muon")]
        with hidden_gradients([p for g in groups for p in g["params"]]):  # AdamW's step skips them
            loss = super().step(closure)
        for group in groups:
            self._muon_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        """One matrix (or one expert stack) at a time: a sharded one is whole on the rank only
        while its own update is computed, so the transient memory is the largest matrix's,
        not the model's."""
        lr = float(group["lr"])
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if "momentum_buffer" not in state:  # and a step count, which AdamW's loading expects
                state["step"] = torch.tensor(0.0)
                state["momentum_buffer"] = torch.zeros_like(param.grad)
            state["step"] += 1
            momentum, buffer = group["momentum"], state["momentum_buffer"]
            buffer.mul_(momentum).add_(param.grad)  # M_t = mu M_{t-1} + G_t
            nesterov = param.grad.add(buffer, alpha=momentum)  # mu M_t + G_t
            whole = nesterov.full_tensor() if isinstance(nesterov, DTensor) else nesterov
            rows, cols = whole.shape[-2:]
            update = hybrid_newton_schulz(whole, self.schedule)  # experts: each on its own
            update = update.mul_(math.sqrt(max(rows, cols)) * group["update_rms"])
            update = update.to(param.dtype)
            if isinstance(nesterov, DTensor):  # this rank's slice of the whole update
                mesh, placements = nesterov.device_mesh, nesterov.placements
                update = distribute_tensor(update, mesh, placements, src_data_rank=None)
            param.mul_(1 - lr * group["weight_decay"])
            param.add_(update, alpha=-lr)
