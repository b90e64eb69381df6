"""Which parameters are weight matrices of linear maps: what Muon (train/muon.py)
orthogonalises, and what `birkhoff plan` counts its state and work for; and which are the
tables V4.1's Sinkhorn-balanced update trains (train/sinkhorn_update.py)."""

from __future__ import annotations

from torch import nn

from birkhoff.model.engram import Engram
from birkhoff.model.moe import GroupedExperts, Router


def weight_matrices(model: nn.Module) -> list[nn.Parameter]:
    """What Muon trains: every linear layer's weight but the head's (and the embedding's,
    which is no linear layer), the routers, and the routed experts' stacked matrices (one
    matrix per expert). AdamW keeps the rest: embeddings, head, norms, mHC static biases and
    gating factors, Engram tables and convolutions, sinks, positional biases."""
    chosen = []
    for name, module in model.named_modules():
        linear = isinstance(module, nn.Linear) and name.split(".")[-1] != "head"
        if linear or isinstance(module, Router):
            chosen.append(module.weight)
        elif isinstance(module, GroupedExperts):
            chosen += [module.w_gate, module.w_up, module.w_down]
    return chosen


def balanced_tables(model: nn.Module) -> list[nn.Parameter]:
    """What the Sinkhorn-balanced update trains: the token embedding, the head (once, if
    tied to it) and the Engram tables."""
    chosen = {}
    for name, module in model.named_modules():
        head = isinstance(module, nn.Linear) and name.split(".")[-1] == "head"
        if head or isinstance(module, nn.Embedding):
            chosen[id(module.weight)] = module.weight
        elif isinstance(module, Engram):
            chosen[id(module.table.weight)] = module.table.weight
    return list(chosen.values())
