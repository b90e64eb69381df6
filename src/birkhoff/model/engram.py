"""Engram conditional memory (arXiv 2601.07372): hashed n-gram lookups gated by the hidden state.

Each Engram layer hashes the last n canonical token ids (orders n = 2..N, K heads per order)
into rows of one embedding table (per-head offsets, a distinct prime row count per head),
concatenates the rows into e_t, gates a shared value W_V e_t per residual stream with
alpha_m = sigmoid(signed_sqrt(<RMSNorm(h_m), RMSNorm(W_K^m e_t)> / sqrt(C))), refines it with a
zero-initialised causal depthwise convolution and adds the result to every stream:
    h_m <- h_m + alpha_m v + SiLU(Conv(RMSNorm(alpha_m v))).
The hash depends on token ids only, so it can be computed before the forward (`hash_tokens`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from birkhoff import kernels
from birkhoff.model.config import EngramConfig
from birkhoff.model.init import constant

STATS_TOKENS = 256  # tokens of a forward whose gates the statistics sample
PAD_ID = 3  # the tokenizer's pad id; its canonical id pads the left edge of every sequence


def distinct_primes(start: int, count: int) -> list[int]:
    """The `count` smallest primes >= start."""
    primes: list[int] = []
    candidate = max(2, start)
    while len(primes) < count:
        if all(candidate % d for d in range(2, int(candidate**0.5) + 1)):
            primes.append(candidate)
        candidate += 1
    return primes


def hash_layout(cfg: EngramConfig, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(multipliers (N,), primes (N-1, K), row offsets (N-1, K)) of one layer; a pure function
    of the config and the layer index, identical in every process."""
    # Explicit CPU tensors: the layout is also computed while a model is built on `meta`.
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer)
    multipliers = torch.randint(1, 2**62, (cfg.max_ngram,), generator=generator, device="cpu") | 1
    heads = cfg.hash_heads
    primes = torch.tensor(distinct_primes(cfg.table_size, heads), dtype=torch.int64, device="cpu")
    offsets = torch.cumsum(primes, 0) - primes
    shape = (cfg.max_ngram - 1, cfg.heads_per_order)
    return multipliers, primes.view(shape), offsets.view(shape)


class Engram(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        n_streams: int,
        cfg: EngramConfig,
        layer: int,
        token_compression: torch.Tensor,
        kernel_backend: str,
        eps: float,
        pad_id: int = PAD_ID,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.layer = layer
        self.lr_multiplier = cfg.lr_multiplier
        multipliers, primes, offsets = hash_layout(cfg, layer)
        for name, value in (
            ("multipliers", multipliers),
            ("primes", primes),
            ("offsets", offsets),
            ("compression", token_compression),
        ):
            constant(self, name, lambda value=value: value, buffer=True, persistent=False)
        self.pad_id = int(token_compression[pad_id])
        memory_dim = primes.numel() * cfg.embed_dim
        self.table = nn.Embedding(int(primes.sum()), cfg.embed_dim)
        self.key = nn.Linear(memory_dim, n_streams * hidden_size, bias=False)
        self.value = nn.Linear(memory_dim, hidden_size, bias=False)
        constant(self, "conv_norm_weight", lambda: torch.ones(hidden_size))
        # Causal depthwise convolution over time, weight[i] applied at lag i * dilation; zero at
        # init so the refinement starts as a no-op.
        constant(self, "conv_weight", lambda: torch.zeros(cfg.conv_kernel, hidden_size))
        self.dilation = cfg.max_ngram
        # Set from outside (optim.engram_update=sparse): the table's gradient is then a sparse
        # tensor over the rows this step looked up (see sparse_table_gradients).
        self.sparse_table_gradient = False
        self._hash = kernels.get("engram_hash", kernel_backend)
        self._merge = kernels.get("engram_merge", kernel_backend)
        # Statistics of training forwards (train/engram_stats.py), not state: the gate sum and
        # count since they were last taken, and which table rows were looked up so far. Tensors
        # only, so that a compiled block (train.compile) updates them without recompiling.
        self.table_rows = int(primes.sum())
        self.gate_stats: torch.Tensor | None = None  # (sum, count), float64
        self.rows_touched: torch.Tensor | None = None

    def hash_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Table rows (B, T, heads) for token ids (B, T)."""
        compressed = self.compression[tokens]
        return self._hash(compressed, self.multipliers, self.primes, self.offsets, self.pad_id)

    def forward(
        self, streams: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """streams (B, T, n, C) (or (B, T, C) for a plain residual) -> updated streams. `rows`
        are this layer's hash_tokens(tokens), when the data loader already computed them."""
        single = streams.dim() == 3
        x = streams.unsqueeze(-2) if single else streams
        global_rows = self.hash_tokens(tokens) if rows is None else rows
        table, rows = self._table_rows(global_rows)
        out, alpha = self._merge(
            table,
            rows,
            self.key.weight,
            self.value.weight,
            x,
            self.conv_norm_weight,
            self.conv_weight,
            self.dilation,
            self.eps,
        )
        if self.training:
            self._record_stats(global_rows, alpha)
        return out.squeeze(-2) if single else out

    def prepare_stats(self, device: torch.device) -> None:
        """Create the statistics on `device` before the first forward (train/model_share.py
        does): a compiled block would otherwise see them appear and compile again."""
        self.rows_touched = torch.zeros(self.table_rows, dtype=torch.bool, device=device)
        self.gate_stats = torch.zeros(2, dtype=torch.float64, device=device)

    @torch.no_grad()
    def _record_stats(self, global_rows: torch.Tensor, alpha: torch.Tensor) -> None:
        """Mark the rows looked up; add the gates (the merge's own, B x T x n) of the first
        sequence's first tokens."""
        if self.rows_touched is None:
            self.prepare_stats(alpha.device)
        self.rows_touched[global_rows.flatten()] = True
        sample = alpha[:1, :STATS_TOKENS]
        self.gate_stats[0] += sample.sum()
        self.gate_stats[1] += sample.numel()

    def take_stats(self, reset: bool = True) -> tuple[float, int]:
        """(gate sum, gate count) since they were last reset (the rows looked up so far stay
        in `rows_touched`)."""
        if self.gate_stats is None:
            return 0.0, 0
        total, count = self.gate_stats.tolist()
        if reset:
            self.gate_stats.zero_()
        return total, int(count)

    def _table_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table, row ids) for the merge op, which gathers the rows. A table sharded from
        outside (parallel.engram_row_shard) fetches its rows itself; the op then reads them
        back in order. So does a table whose gradient is sparse (on the device or the host)."""
        if not isinstance(self.table, nn.Embedding):
            memory = self.table(rows)
        elif not self.sparse_table_gradient:
            return self.table.weight, rows
        else:
            weight = self.table.weight
            memory = F.embedding(rows.to(weight.device), weight, sparse=True)
            memory = memory.to(rows.device, non_blocking=True)
        order = torch.arange(rows.numel(), device=rows.device).view_as(rows)
        return memory.flatten(0, -2), order


def sparse_table_gradients(model: nn.Module) -> list[nn.Parameter]:
    """Make every Engram table of `model` take row-sparse gradients; returns the tables."""
    tables = []
    for module in model.modules():
        if isinstance(module, Engram):
            module.sparse_table_gradient = True
            tables.append(module.table.weight)
    return tables
