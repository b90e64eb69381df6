"""DeepSeek-V4 attention (report §2.3): shared-KV multi-query attention over a sliding window
plus, in CSA and HCA layers, compressed KV entries, with per-head sinks and a grouped output.

Per layer: queries through a low-rank path (RMSNorm on the latent, then per head), one KV
entry per token that serves as key and value (RMSNorm), interleaved RoPE on the last
`rope_head_dim` channels and the same rotation undone (position -i) on the output. Every query
sees the `sliding_window` tokens up to itself; an HCA layer adds every compressed entry complete
before it, a CSA layer the top-k entries its lightning indexer picks. One softmax covers the
window, the entries and a learned sink logit per head. Nothing is T x T: the window is computed
in blocks of `sliding_window` queries against two blocks of keys.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from birkhoff.model.compression import (
    BlockEntries,
    KVCompressor,
    LightningIndexer,
    block_entries,
    indexer_kl,
    topk_recall,
)
from birkhoff.model.config import AttentionConfig
from birkhoff.model.context import SequenceContext
from birkhoff.model.group_sums import shared_over, summed_over
from birkhoff.model.init import constant
from birkhoff.model.norm import RMSNorm
from birkhoff.model.recompute import recomputing
from birkhoff.model.rope import rope_inv_freq, rotate_trailing, yarn_inv_freq

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
        # Per training forward of a CSA layer: (indexer KL, 1, recall hits, recall wanted).
        self.recorded: list[torch.Tensor] = []
        # Set when tensor parallelism splits the heads (sinks, output groups, indexer heads)
        # over a process group; the KV entry and the compressors stay whole on every process.
        self.head_group: dist.ProcessGroup | None = None
        # The indexer's dense warm-up (train.indexer_warmup_steps): a CSA layer attends to every
        # visible entry and its indexer learns the attention over all of them.
        self.dense_indexing = False

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
        q = F.rms_norm(q.float(), (self.head_dim,), eps=self.eps).to(q.dtype)
        q = rotate_trailing(q, cos[:, :, None], sin[:, :, None])
        kv = rotate_trailing(self.kv_norm(self.w_kv(x)), cos, sin)
        kv = shared_over(kv, self.head_group)
        window_logits, window_keys = self._window_logits(q, kv, positions)
        entry_logits, entry_values, indexer_outputs = self._entries(
            x, q, q_latent, positions, cos, sin
        )
        sinks = _local(self.sinks).float().view(1, 1, -1, 1).expand(batch, seq, -1, 1)
        logits = torch.cat((window_logits, entry_logits, sinks), dim=-1)
        probs = torch.softmax(logits, dim=-1)
        width = window_logits.shape[-1]
        p_window = probs[..., :width].to(kv.dtype)
        p_entries = probs[..., width:-1].to(kv.dtype)
        out = self._window_sum(p_window, window_keys, seq)
        out = out + _entry_sum(p_entries, entry_values)
        if indexer_outputs is not None and aux_losses is not None:
            index, picked, recall = indexer_outputs
            mass = summed_over(probs[..., width:-1].detach().sum(-2), self.head_group)
            loss = indexer_kl(mass, index, picked)
            aux_losses.append(self.cfg.index_loss_weight * loss)
            if self.training and not recomputing():  # recall: none in the dense warm-up
                one, zero = torch.ones_like(loss), torch.zeros_like(loss)
                hits, wanted = recall if recall is not None else (zero, zero)
                self.recorded.append(torch.stack((loss.detach(), one, hits, wanted)).double())
        out = rotate_trailing(out, cos[:, :, None], -sin[:, :, None])  # undo RoPE on values
        weight = _local(self.w_o_groups.weight)  # this process's groups of heads
        weight = weight.view(-1, self.cfg.o_lora_rank, weight.shape[-1])
        groups = out.reshape(batch, seq, weight.shape[0], -1)
        mixed = torch.einsum("btgi,gri->btgr", groups, weight).flatten(2)
        return self.w_o(mixed)

    def _window_logits(
        self, q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, H, 2W) of each query against the two key blocks around it (-inf
        outside its window and its document) and those keys (B, T/W blocks, 2W, D)."""
        batch, seq = positions.shape
        window = self.cfg.sliding_window
        blocks = -(-seq // window)
        padded = blocks * window
        q_blocks = F.pad(q, (0, 0, 0, 0, 0, padded - seq))
        q_blocks = q_blocks.view(batch, blocks, window, -1, q.shape[-1])
        kv_padded = F.pad(kv, (0, 0, window, padded - seq)).view(batch, blocks + 1, window, -1)
        keys = torch.cat((kv_padded[:, :-1], kv_padded[:, 1:]), dim=2)  # (B, nb, 2W, D)
        logits = torch.einsum("bnqhd,bnkd->bnqhk", q_blocks.float(), keys.float())
        logits = logits * self.head_dim**-0.5
        query = torch.arange(padded, device=q.device).view(blocks, window, 1)
        key = (torch.arange(blocks, device=q.device) * window - window).view(blocks, 1, 1)
        key = key + torch.arange(2 * window, device=q.device)
        behind = query - key  # (nb, W, 2W): how far each key lies behind the query
        in_document = F.pad(positions, (0, padded - seq)).view(batch, blocks, window, 1)
        allowed = (behind >= 0) & (behind < window) & (behind <= in_document)
        logits = logits.masked_fill(~allowed[:, :, :, None, :], -torch.inf)
        return logits.flatten(1, 2)[:, :seq], keys

    def _window_sum(self, p: torch.Tensor, keys: torch.Tensor, seq: int) -> torch.Tensor:
        batch, blocks = keys.shape[:2]
        padded = blocks * self.cfg.sliding_window
        p = F.pad(p, (0, 0, 0, 0, 0, padded - seq)).view(batch, blocks, -1, *p.shape[2:])
        out = torch.einsum("bnqhk,bnkd->bnqhd", p, keys)
        return out.flatten(1, 2)[:, :seq]

    def _entries(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        q_latent: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None]:
        """Logits (B, T, H, K) against the compressed entries each query may attend to, their
        values ((B, E, D) for HCA, (B, T, K, D) for CSA), and for CSA the indexer's scores at
        its picks and their validity (for its loss) and, in a training forward, its recall
        against dense attention on a sample of queries (None otherwise)."""
        batch, seq, heads, _ = q.shape
        if self.compressor is None:
            return q.new_zeros(batch, seq, heads, 0, dtype=torch.float32), None, None
        entries: BlockEntries = block_entries(positions, self.compressor.ratio)
        values = shared_over(self.compressor(x, entries, self.inv_freq), self.head_group)
        scale = self.head_dim**-0.5
        if self.indexer is None or self.dense_indexing:  # HCA, or CSA's warm-up: every entry
            visible = entries.visible(positions)
            logits = torch.einsum("bthd,bed->bthe", q.float(), values.float()) * scale
            logits = logits.masked_fill(~visible[:, :, None, :], -torch.inf)
            if self.indexer is None:
                return logits, values, None
            index = self.indexer.score_all(  # inputs cut from the graph, as below
                x.detach(), q_latent.detach(), entries, positions, cos, sin, self.inv_freq
            )
            return logits, values, (index, visible, None)
        # The indexer learns only from its own loss: its inputs are cut from the model's graph.
        picks, picked, index = self.indexer(
            x.detach(), q_latent.detach(), entries, positions, cos, sin, self.inv_freq
        )
        rows = torch.arange(batch, device=x.device)[:, None, None]
        chosen = values[rows, picks]  # (B, T, k, D)
        logits = torch.einsum("bthd,btkd->bthk", q.float(), chosen.float()) * scale
        logits = logits.masked_fill(~picked[:, :, None, :], -torch.inf)
        recall = None
        # Also while a checkpointed block recomputes (only the first forward records it):
        # selective checkpointing hands recompute its saved matmul outputs in forward's order.
        if self.training:
            sample = slice(max(0, seq - RECALL_QUERIES), seq)
            recall = topk_recall(
                q[0, sample], values[0], entries.visible(positions, sample)[0],
                picks[0, sample], picked[0, sample], scale, self.head_group,
            )  # fmt: skip
        return logits, chosen, (index, picked, recall)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter tensor parallelism split (the whole one otherwise)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _entry_sum(p: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor | int:
    if values is None:
        return 0
    if values.dim() == 3:  # HCA: (B, E, D) shared by all queries
        return torch.einsum("bthe,bed->bthd", p, values)
    return torch.einsum("bthk,btkd->bthd", p, values)


def take_indexer_stats(model: nn.Module) -> torch.Tensor:
    """(KL sum, forwards, recall hits, recall wanted) over the CSA layers of `model` since the
    last call (float64; zeros without CSA layers); reading resets them."""
    total = torch.zeros(4, dtype=torch.float64)
    for module in model.modules():
        if isinstance(module, V4Attention) and module.recorded:
            total += torch.stack(module.recorded).sum(0).cpu()
            module.recorded = []
    return total
