"""DeepSeek-V4.1's Sinkhorn-balanced update (report Alg. 1) for embeddings, the head and
Engram tables: tables whose rows see very different gradient traffic (frequent and rare
tokens, hot and cold hash buckets), where AdamW's per-element scaling lets a few rows dominate.

For a table W (r rows of length n) with gradient G:
    M_t = beta M_{t-1} + (1 - beta) G_t          (EMA momentum, beta 0.95)
    G^  = beta M_t + (1 - beta) G_t              (Nesterov)
    rows with ||G^_i|| <= tau * mean_i ||G^_i|| are zeroed (tau 1e-3: untouched rows stay put)
    U   = K alternating L2 normalisations of G^: rows (k odd), columns (k even); K = 11
    W  <- W - lr gamma sqrt(n) U                 (gamma 0.18; no weight decay)
K is odd, so U ends with unit rows: sqrt(n) U has RMS 1 and the update RMS gamma, the same
scale as Muon's updates (we read the report's n as the row length for that reason).
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

ITERATIONS = 11
ROW_THRESHOLD = 1e-3
EPS = 1e-20


def sinkhorn_balanced(
    gradient: torch.Tensor,
    iterations: int = ITERATIONS,
    tau: float = ROW_THRESHOLD,
    eps: float = EPS,
) -> torch.Tensor:
    """(r, n) -> U (r, n) in float32: quiet rows zeroed, then rows and columns normalised in
    turn, `iterations` times, starting with the rows."""
    x = gradient.float()
    row_norms = x.norm(dim=1, keepdim=True)
    x = x.masked_fill(row_norms <= tau * row_norms.mean(), 0.0)
    for k in range(1, iterations + 1):
        dim = 1 if k % 2 else 0  # odd: each row's norm; even: each column's
        x = x / (x.norm(dim=dim, keepdim=True) + eps)
    return x


@torch.no_grad()
def sinkhorn_step(param: torch.Tensor, state: dict, group: dict) -> None:
    """One update of `param` from its .grad (dense) with the group's lr, momentum and
    update_rms. A sharded table (DTensor) is balanced whole: the column norms span every
    row, so each rank applies its slice of the one-process update."""
    grad = param.grad
    if grad.is_sparse:
        raise ValueError("the Sinkhorn-balanced update needs dense gradients")
    if "momentum_buffer" not in state:  # and a step count, which AdamW's loading expects
        state["step"] = torch.tensor(0.0)
        state["momentum_buffer"] = torch.zeros_like(grad)
    state["step"] += 1
    beta, buffer = group["momentum"], state["momentum_buffer"]
    buffer.lerp_(grad, 1 - beta)  # M_t = beta M_{t-1} + (1 - beta) G_t
    nesterov = grad.lerp(buffer, beta)  # beta M_t + (1 - beta) G_t
    whole = nesterov.full_tensor() if isinstance(nesterov, DTensor) else nesterov
    update = sinkhorn_balanced(whole)
    update = update.mul_(math.sqrt(update.shape[1]) * group["update_rms"]).to(param.dtype)
    if isinstance(nesterov, DTensor):
        mesh, placements = nesterov.device_mesh, nesterov.placements
        update = distribute_tensor(update, mesh, placements, src_data_rank=None)
    param.add_(update, alpha=-float(group["lr"]))
