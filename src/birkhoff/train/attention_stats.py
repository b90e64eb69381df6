"""The lightning indexers' statistics over the whole model, however it is spread over ranks."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from birkhoff.model.v4_attention import take_indexer_stats
from birkhoff.parallel.distributed import DistributedContext


def indexer_stats(
    parts: list[nn.Module], ctx: DistributedContext, has_indexer: bool
) -> dict[str, float]:
    """`indexer_kl`: the mean of the indexers' loss over CSA layers and training forwards of
    the step; `indexer_recall`: the share of the entries dense attention weighs most (top-k,
    summed over heads) that the indexers picked, on sampled queries. Summed over every rank
    (data-parallel ranks saw other tokens, pipeline stages hold other layers). All ranks call
    it when the model has a CSA layer (`has_indexer`), whichever layers they hold."""
    if not has_indexer:
        return {}
    total = sum(take_indexer_stats(part) for part in parts)
    if ctx.world_size > 1:
        total = total.to(ctx.device)
        dist.all_reduce(total)
    kl_sum, forwards, hits, wanted = total.tolist()
    return {
        "indexer_kl": kl_sum / forwards if forwards else float("nan"),
        "indexer_recall": hits / wanted if wanted else float("nan"),
    }
