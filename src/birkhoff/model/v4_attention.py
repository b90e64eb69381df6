"""DeepSeek-V4 attention (report §2.3): shared-KV multi-query attention over a sliding window
plus, in CSA and HCA layers, compressed KV entries, with per-head sinks and a grouped output.

Per layer: queries through a low-rank path (RMSNorm on the latent, then per head), one KV
entry per token that serves as key and value (RMSNorm), interleaved RoPE on the last
`rope_head_dim` channels and the same rotation undone (position -i) on the output. Every query
sees the `sliding_window` tokens up to itself; an HCA layer adds every compressed entry complete
before it, a CSA layer the top-k entries its lightning indexer picks. One softmax covers the
window, the entries and a learned sink logit per head: the `v4_attention` kernel op
(kernels/v4_attention.py; never T x T), whose normaliser also gives the CSA indexer its target.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from birkhoff import kernels
from birkhoff.kernels.indexer_loss import composed_indexer_loss, indexer_kl
from birkhoff.kernels.registry import matmul_dtype
from birkhoff.kernels.v4_attention import EntryKV, dense_entry_mass
from birkhoff.model.compression import KVCompressor, LightningIndexer, block_entries, topk_recall
from birkhoff.model.config import AttentionConfig
from birkhoff.model.context import SequenceContext
from birkhoff.model.group_sums import shared_over, summed_over
from birkhoff.model.init import constant
from birkhoff.model.norm import RMSNorm
from birkhoff.model.recompute import recomputing
from birkhoff.model.rope import rope_inv_freq, yarn_inv_freq
from birkhoff.model.step_casts import StepCasts

RECALL_QUERIES = 256  # the last queries of a batch's first sequence: the most entries visible


class V4Attention(nn.Module):
    def __init__(
        self,
        hidden: int,
        num_heads: int,
        cfg: AttentionConfig,
        layer_type: str,
        eps: float,
        rope_theta: float,
        backend: str = "reference",
    ) -> None:
        super().__init__()
        self.cfg, self.layer_type, self.eps = cfg, layer_type, eps
        self.num_heads, self.head_dim = num_heads, cfg.head_dim
        self.w_q_down = nn.Linear(hidden, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, eps, backend)
        self.w_q_up = nn.Linear(cfg.q_lora_rank, num_heads * cfg.head_dim, bias=False)
        self.w_kv = nn.Linear(hidden, cfg.head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.head_dim, eps, backend)
        constant(self, "sinks", lambda: torch.zeros(num_heads))
        group_width = num_heads * cfg.head_dim // cfg.o_groups
        # (groups x rank, group width): one block of the block-diagonal first output matrix
        # per group of heads, as transformers' DeepseekV4 lays it out.
        self.w_o_groups = nn.Linear(group_width, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.step_casts = StepCasts()  # w_o_groups' grouped view, cast by _output_groups
        self.w_o = nn.Linear(cfg.o_groups * cfg.o_lora_rank, hidden, bias=False)
        compressed = layer_type != "sliding"
        # V4: compressed layers (all their branches) rotate slower, and only they take YaRN
        inv_freq = lambda: (  # noqa: E731
            yarn_inv_freq(
                cfg.rope_head_dim,
                cfg.compress_rope_theta,
                cfg.yarn_factor,
                cfg.yarn_original_seq_len,
                cfg.yarn_beta_fast,
                cfg.yarn_beta_slow,
            )
            if compressed
            else rope_inv_freq(cfg.rope_head_dim, rope_theta)
        )
        constant(self, "inv_freq", inv_freq, buffer=True, persistent=False)
        ratio = cfg.csa_ratio if layer_type == "csa" else cfg.hca_ratio
        self.compressor = (
            KVCompressor(hidden, cfg.head_dim, ratio, layer_type == "csa", eps, backend)
            if compressed
            else None
        )
        self.indexer = (
            LightningIndexer(
                hidden,
                cfg.q_lora_rank,
                cfg.index_heads,
                cfg.index_head_dim,
                cfg.csa_ratio,
                cfg.index_topk,
                eps,
                backend,
            )
            if layer_type == "csa"
            else None
        )
        # Summed over the training forwards of a CSA layer since they were last taken:
        # (indexer KL, forwards, recall hits, recall wanted), float64. One tensor updated in
        # place (made before the first forward, `prepare_stats`): a list growing by one per
        # micro-batch made a compiled block recompile for every micro-batch of a step.
        self.indexer_stats: torch.Tensor | None = None
        # Set when tensor parallelism splits the heads (sinks, output groups, indexer heads)
        # over a process group; the KV entry and the compressors stay whole on every process.
        self.head_group: dist.ProcessGroup | None = None
        self._attend = kernels.get("v4_attention", backend)
        self._rotate = kernels.get("rope_trailing", backend)
        self._entry_mass = kernels.get("entry_mass", backend)
        self._indexer_loss = kernels.get("indexer_loss", backend)
        # The indexer's dense warm-up (train.indexer_warmup_steps): a CSA layer attends to every
        # visible entry and its indexer learns the attention over all of them.
        self.dense_indexing = False

    def prepare_stats(self, device: torch.device) -> None:
        """Create the indexer statistics on `device` before the first forward (as
        train/model_share.py does): a compiled block would otherwise see them appear."""
        self.indexer_stats = torch.zeros(4, dtype=torch.float64, device=device)

    def forward(
        self, x: torch.Tensor, ctx: SequenceContext, aux_losses: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C). A CSA layer appends its indexer's loss to `aux_losses`
        (weight `index_loss_weight`)."""
        batch, seq, _ = x.shape
        positions = ctx.positions_for(batch, seq, x.device)
        angles = positions[..., None].float() * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        q_latent = self.q_norm(self.w_q_down(x))
        q = self.w_q_up(q_latent).view(batch, seq, -1, self.head_dim)  # this process's heads
        # per head, normalised without a weight (in float32), then turned: one op
        q = self._rotate(q, cos[:, :, None], sin[:, :, None], norm_eps=self.eps)
        kv = self._rotate(self.kv_norm(self.w_kv(x)), cos, sin)
        kv = shared_over(kv, self.head_group)
        entries, indexer_outputs = self._entries(x, q, q_latent, positions, cos, sin)
        window = self.cfg.sliding_window
        out, lse = self._attend(q, kv, positions, _local(self.sinks), window, entries)
        if indexer_outputs is not None and aux_losses is not None:
            inputs, picked, recall = indexer_outputs
            if entries.picks is None:  # the dense warm-up: every visible entry
                mass = dense_entry_mass(q, positions, entries, lse.detach())
                loss = indexer_kl(summed_over(mass, self.head_group), inputs, picked)
            else:
                loss = self._indexer_loss_at_picks(q, entries, lse.detach(), inputs)
            aux_losses.append(self.cfg.index_loss_weight * loss)
            if self.training and not recomputing():  # recall: none in the dense warm-up
                one, zero = torch.ones_like(loss), torch.zeros_like(loss)
                hits, wanted = recall if recall is not None else (zero, zero)
                if self.indexer_stats is None:
                    self.prepare_stats(loss.device)
                self.indexer_stats += torch.stack((loss.detach(), one, hits, wanted)).double()
        out = self._rotate(out, cos[:, :, None], sin[:, :, None], inverse=True)  # off the values
        weight = self._output_groups(matmul_dtype(out))
        groups = out.reshape(batch, seq, weight.shape[0], -1)
        mixed = torch.einsum("btgi,gri->btgr", groups, weight).flatten(2)
        return self.w_o(mixed)

    def _output_groups(self, dtype: torch.dtype) -> torch.Tensor:
        """This process's groups of the output projection, (groups, rank, width) in the
        matmul's dtype: cast here, as autocast never keeps a cast of a view."""
        weight = _local(self.w_o_groups.weight)  # this process's groups of heads
        (cast,) = self.step_casts.get(dtype, (weight,))
        return cast.view(-1, self.cfg.o_lora_rank, weight.shape[-1])

    def _indexer_loss_at_picks(
        self, q: torch.Tensor, entries: EntryKV, lse: torch.Tensor, inputs: tuple
    ) -> torch.Tensor:
        """The indexer's KL to the attention over its picks: the backend's `indexer_loss` on
        all heads; with the heads split over tensor-parallel ranks, its parts with each
        rank's heads summed before the KL."""
        args = (q, entries.values, lse, *inputs, entries.picks, entries.picked)
        if self.head_group is None:
            return self._indexer_loss(*args)
        group = self.head_group
        return composed_indexer_loss(
            self._entry_mass, *args, head_sum=lambda part: summed_over(part, group)
        )

    def _entries(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        q_latent: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[EntryKV | None, tuple | None]:
        """The compressed entries the queries attend to (none in a sliding layer) and, for
        CSA, what its indexer's loss takes: in the dense warm-up the scores of every entry
        and their visibility, else the indexer's queries, keys and head weights and whether
        each pick is visible; in a training forward also its recall against dense attention
        on a sample of queries."""
        if self.compressor is None:
            return None, None
        layout = block_entries(positions, self.compressor.ratio)
        values = shared_over(self.compressor(x, layout, self.inv_freq), self.head_group)
        if self.indexer is None:  # HCA: every visible entry
            return EntryKV(values, layout), None
        if self.dense_indexing:  # CSA's warm-up: every visible entry, the indexer scores all
            index = self.indexer.score_all(  # inputs cut from the graph, as below
                x.detach(), q_latent.detach(), layout, positions, cos, sin, self.inv_freq
            )
            return EntryKV(values, layout), (index, layout.visible(positions), None)
        # The indexer learns only from its own loss: its inputs are cut from the model's graph.
        picks, picked, inputs = self.indexer(
            x.detach(), q_latent.detach(), layout, positions, cos, sin, self.inv_freq
        )
        recall = None
        # Also while a checkpointed block recomputes (only the first forward records it):
        # selective checkpointing hands recompute its saved matmul outputs in forward's order.
        if self.training:
            seq = x.shape[1]
            sample = slice(max(0, seq - RECALL_QUERIES), seq)
            recall = topk_recall(
                q[0, sample], values[0], layout.visible(positions, sample)[0],
                picks[0, sample], picked[0, sample], self.head_dim**-0.5, self.head_group,
            )  # fmt: skip
        return EntryKV(values, layout, picks, picked), (inputs, picked, recall)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter tensor parallelism split (the whole one otherwise)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def take_indexer_stats(model: nn.Module) -> torch.Tensor:
    """(KL sum, forwards, recall hits, recall wanted) over the CSA layers of `model` since the
    last call (float64; zeros without CSA layers); reading resets them."""
    stats = [
        m.indexer_stats
        for m in model.modules()
        if isinstance(m, V4Attention) and m.indexer_stats is not None
    ]
    if not stats:
        return torch.zeros(4, dtype=torch.float64)
    total = torch.stack(stats).sum(0).cpu()  # one copy to the host per step, not one per layer
    for found in stats:
        found.zero_()
    return total
