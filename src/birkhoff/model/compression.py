"""DeepSeek-V4's compressed KV entries (report §2.3) and the lightning indexer.

Every `ratio` tokens of a document become one KV entry: a softmax-gated, per-channel convex
combination of their projected states plus a learned positional bias, RMS-normalised and
rotated to the position of the block's first token. HCA (`overlap=False`) reads the block
alone; CSA (`overlap=True`) also reads the previous block of the same document through a second
projection (2 x ratio slots per entry), as V4's Ca/Cb series.

Blocks align with document starts (positions restart at 0 in a packed window), so a packed
document is compressed exactly as it would be on its own; a block that a document does not
complete is no entry. A query sees an entry once the whole block lies at or before it, in its
own document.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from birkhoff import kernels
from birkhoff.kernels.indexer_loss import index_scores
from birkhoff.kernels.v4_attention import BlockEntries
from birkhoff.model.group_sums import shared_over, summed_over
from birkhoff.model.init import constant
from birkhoff.model.norm import RMSNorm

SCORES_PER_BLOCK = 1 << 24  # index scores held at once while the indexer picks (64 MiB)


def queries_per_block(entries: int, heads: int, batch: int) -> int:
    """Queries the indexer scores at once: as many as keep their scores against `entries`
    compressed entries within SCORES_PER_BLOCK."""
    return max(1, SCORES_PER_BLOCK // max(1, entries * heads * batch))


def block_entries(positions: torch.Tensor, ratio: int) -> BlockEntries:
    """The complete `ratio`-token blocks of every document in (B, T) position ids."""
    batch, seq = positions.shape
    t = torch.arange(seq, device=positions.device).expand(batch, -1)
    doc_start = t - positions
    last = (t + ratio - 1).clamp(max=seq - 1)
    complete = (t + ratio - 1 < seq) & (doc_start.gather(1, last) == doc_start)
    is_start = complete & (positions % ratio == 0)
    slots = seq // ratio  # disjoint blocks: never more starts than this
    order = torch.argsort((~is_start).to(torch.int8), dim=1, stable=True)[:, :slots]
    exists = is_start.gather(1, order)
    start = torch.where(exists, order, torch.zeros_like(order))
    position = positions.gather(1, start)
    return BlockEntries(start, exists, exists & (position >= ratio), position, ratio)


class KVCompressor(nn.Module):
    """Compressed entries of width `dim` from hidden states (B, T, C)."""

    def __init__(
        self, hidden: int, dim: int, ratio: int, overlap: bool, eps: float, backend: str
    ) -> None:
        super().__init__()
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        width = 2 * dim if overlap else dim  # CSA: [Ca (next entry) | Cb (this entry)]
        self.w_kv = nn.Linear(hidden, width, bias=False)
        self.w_gate = nn.Linear(hidden, width, bias=False)
        constant(self, "position_bias", lambda: torch.zeros(ratio, width))
        self.norm = RMSNorm(dim, eps, backend)
        self._compress = kernels.get("kv_compress", backend)
        self._rotate = kernels.get("rope_trailing", backend)

    def forward(
        self, x: torch.Tensor, entries: BlockEntries, inv_freq: torch.Tensor
    ) -> torch.Tensor:
        """(B, E, dim) entries, rotated on their trailing RoPE channels."""
        gated = self._compress(
            self.w_kv(x), self.w_gate(x), self.position_bias, entries.start, entries.exists,
            entries.has_previous, self.overlap,
        )  # fmt: skip
        compressed = self.norm(gated)  # entries that do not exist: 0, and 0 normed
        angles = entries.position[..., None].float() * inv_freq
        return self._rotate(compressed, angles.cos(), angles.sin())


class LightningIndexer(nn.Module):
    """Scores I[t, s] = sum_h w[t, h] ReLU(q[t, h] . k[s]) of queries against CSA entries
    (V4 §2.3.1, after DeepSeek-V3.2's DSA) and picks each query's top-k visible entries."""

    def __init__(
        self,
        hidden: int,
        q_rank: int,
        heads: int,
        head_dim: int,
        ratio: int,
        topk: int,
        eps: float,
        backend: str,
    ) -> None:
        super().__init__()
        self.heads, self.head_dim, self.topk = heads, head_dim, topk
        self.compressor = KVCompressor(hidden, head_dim, ratio, True, eps, backend)
        self.w_q = nn.Linear(q_rank, heads * head_dim, bias=False)
        self.w_weights = nn.Linear(hidden, heads, bias=False)
        self._rotate = kernels.get("rope_trailing", backend)
        self.head_group: dist.ProcessGroup | None = None  # see V4Attention.head_group

    def forward(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        entries: BlockEntries,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        inv_freq: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each query's top-k visible entries (B, T, k), whether each pick is visible, and
        the indexer's queries (B, T, heads here, D), keys (B, E, D) and head weights (B, T,
        heads here), differentiable, for its loss (kernels' `indexer_loss`, which scores the
        picks again with their gradient: where it reads them from every entry's, twice the
        scoring's forward work, against once when this forward kept them with their gradient;
        tiny's step within the machine's noise). Selection scores all entries a block of
        queries at a time without gradients, so its memory stays within SCORES_PER_BLOCK."""
        batch, seq, _ = x.shape
        keys, q, weights = self._inputs(x, q_latent, entries, cos, sin, inv_freq)
        k = min(self.topk, keys.shape[1])
        picks = torch.empty(batch, seq, k, dtype=torch.long, device=x.device)
        picked = torch.empty(batch, seq, k, dtype=torch.bool, device=x.device)
        block = queries_per_block(keys.shape[1], self.heads, batch)
        with torch.no_grad():
            for first in range(0, seq, block):
                queries = slice(first, min(seq, first + block))
                index = index_scores(q[:, queries], keys, weights[:, queries])
                index = summed_over(index, self.head_group)
                index = index.masked_fill(~entries.visible(positions, queries), -torch.inf)
                top = index.topk(k, dim=-1)
                picks[:, queries], picked[:, queries] = top.indices, torch.isfinite(top.values)
        return picks, picked, (q, keys, weights)

    def score_all(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        entries: BlockEntries,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        inv_freq: torch.Tensor,
    ) -> torch.Tensor:
        """Index scores (B, T, E) of every query against every entry, -inf where the entry is
        not visible; differentiable (the dense warm-up's loss covers all entries)."""
        keys, q, weights = self._inputs(x, q_latent, entries, cos, sin, inv_freq)
        index = summed_over(index_scores(q, keys, weights), self.head_group)
        return index.masked_fill(~entries.visible(positions), -torch.inf)

    def _inputs(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        entries: BlockEntries,
        cos: torch.Tensor,
        sin: torch.Tensor,
        inv_freq: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compressed keys (B, E, D), rotated queries (B, T, heads here, D), head weights."""
        batch, seq, _ = x.shape
        keys = shared_over(self.compressor(x, entries, inv_freq).float(), self.head_group)
        q = self.w_q(q_latent).view(batch, seq, -1, self.head_dim)  # this process's heads
        q = self._rotate(q, cos[:, :, None], sin[:, :, None]).float()
        return keys, q, self.w_weights(x).float() * self.heads**-0.5


@torch.no_grad()
def topk_recall(
    q: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    picks: torch.Tensor,
    picked: torch.Tensor,
    scale: float,
    head_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of the entries dense attention weighs most the indexer picked: for queries
    q (S, H, D) against entries (E, D) they may see (S, E), the top-k entries by attention
    probability summed over heads (k = picks per query, at most the visible count) against
    the picks (S, k) that are valid. Returns (hits, wanted), summed over the queries."""
    logits = torch.einsum("shd,ed->she", q.float(), values.float()) * scale
    logits = logits.masked_fill(~visible[:, None, :], -torch.inf)
    mass = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(1)  # (S, E); no entry: zeros
    mass = summed_over(mass, head_group)
    k = picks.shape[-1]
    wanted = visible.sum(-1).clamp(max=k)
    best = mass.topk(k, dim=-1).indices
    in_best = torch.zeros_like(visible).scatter(
        -1, best, torch.arange(k, device=q.device).expand_as(best) < wanted[:, None]
    )
    chosen = torch.zeros_like(visible).scatter(-1, picks, picked)
    return (in_best & chosen).sum(), wanted.sum()
