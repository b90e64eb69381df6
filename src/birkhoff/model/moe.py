"""DeepSeekMoE feed-forward: fine-grained routed experts plus shared experts (arXiv 2412.19437).

Routing: scores s = sigmoid(u e_i) (or sqrt(softplus(.))); the top-k experts are chosen on
s + b, where the bias b only steers selection; gate weights are the chosen s, normalised, times
route_scale. b is balanced without an auxiliary loss: after each optimizer step,
b_i += gamma * sign(mean load - load_i) with loads counted over the global batch (the trainer
does this through `update_bias`). An optional sequence-wise balance loss is returned per call.

Hash routing (DeepSeek-V4, its first MoE layers): the experts of a token are fixed by its id
through a table, drawn once from a seed so that every expert serves the same number of
vocabulary ids; the gate weights are still the router's normalised scores of those experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from birkhoff import kernels
from birkhoff.kernels.reference import group_ends
from birkhoff.kernels.registry import matmul_dtype
from birkhoff.model.config import MoEConfig
from birkhoff.model.init import constant
from birkhoff.model.mlp import SwiGLU
from birkhoff.model.recompute import recomputing
from birkhoff.model.step_casts import StepCasts


def hash_routing_table(vocab_size: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """(vocab_size, top_k) int64: the experts of every token id, distinct within a row, each
    expert in vocab_size * top_k / num_experts rows (+-1). Rows are read off a stream of
    seeded permutations of the experts; a row that crosses from one permutation into the
    next redraws the next until the row has no repeat. A pure function of its arguments."""
    generator = torch.Generator().manual_seed(seed)
    slots, filled, laps = vocab_size * top_k, 0, []
    while filled < slots:
        lap = torch.randperm(num_experts, generator=generator, device="cpu")
        carried = filled % top_k  # experts of the previous lap in the row that crosses over
        while laps and carried and torch.isin(lap[: top_k - carried], laps[-1][-carried:]).any():
            lap = torch.randperm(num_experts, generator=generator, device="cpu")
        laps.append(lap)
        filled += num_experts
    return torch.cat(laps)[:slots].view(vocab_size, top_k)


class Router(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        cfg: MoEConfig,
        hash_table: torch.Tensor | None = None,
        kernel_backend: str = "reference",
    ) -> None:
        """`hash_table` (vocab, top_k): route by token id (a hash layer) instead of top-k."""
        super().__init__()
        self.cfg = cfg
        self._route = kernels.get("moe_route", kernel_backend)
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))
        # saved with the model
        constant(self, "bias", lambda: torch.zeros(cfg.num_experts), buffer=True)
        self.hash_table: torch.Tensor | None
        # Drawn from the seed, and saved: an imported table (V4's tid2eid) is not the seed's.
        if hash_table is None:
            self.register_buffer("hash_table", None)
        else:
            constant(self, "hash_table", lambda: hash_table, buffer=True)

    def reset_parameters(self, std: float) -> None:
        """Normal(0, std) weights and a zero bias, for a router used on its own (a model
        initialises through model/init.py)."""
        nn.init.normal_(self.weight, std=std)
        self.bias.zero_()

    def forward(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        planned: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C), token ids (N,) -> gate weights (N, k), expert ids (N, k), scores (N, E).
        `planned` (N, k): the experts to use instead of this call's own choice (Anticipatory
        Routing); the gate weights are still this call's scores of those experts."""
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):  # gating in fp32, as in DeepSeek-V3
            logits = F.linear(x.float(), self.weight.float())
        expert_ids = None
        if self.hash_table is not None:
            expert_ids = self.hash_table[token_ids]
        elif planned is not None:
            expert_ids = planned.long()
        # the scores, the choice (unless made above; within the best groups where the
        # experts are grouped) and the gate weights: one op
        return self._route(logits, self.bias, cfg.top_k, cfg.score_func, cfg.route_scale,
                           expert_ids, cfg.num_groups, cfg.topk_groups)  # fmt: skip

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """One aux-loss-free balancing step from the global per-expert token counts (none in
        a hash layer: its bias would steer nothing)."""
        if self.hash_table is not None:
            return
        self.bias += self.cfg.bias_update_rate * torch.sign(load.float().mean() - load.float())


def _whole_sequences(statistics: torch.Tensor) -> torch.Tensor:
    return statistics


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's experts: expert parallelism (applied from outside) makes the stacked
    weights DTensors sharded on the expert dim, and the inputs arrive already dispatched."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked matrices and run as grouped GEMMs."""

    def __init__(self, hidden_size: int, cfg: MoEConfig, kernel_backend: str) -> None:
        super().__init__()
        e, f = cfg.num_experts, cfg.expert_ffn_hidden_size
        self.w_gate = nn.Parameter(torch.empty(e, hidden_size, f))
        self.w_up = nn.Parameter(torch.empty(e, hidden_size, f))
        self.w_down = nn.Parameter(torch.empty(e, f, hidden_size))
        self._gemm = kernels.get("grouped_gemm", kernel_backend)
        self._swiglu = kernels.get("swiglu", kernel_backend)
        self.limit = cfg.swiglu_limit
        self.step_casts = StepCasts()  # grouped_mm's weights are cast here, not by autocast

    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal(0, std) gate and up, Normal(0, out_std) down projections, for experts used on
        their own (a model initialises through model/init.py)."""
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=out_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, C) sorted by expert, counts (E,) -> (M, C)."""
        w_gate, w_up, w_down = self._weights(x.dtype)
        offsets = group_ends(counts)  # once for the three GEMMs
        gate, up = self._gemm(x, w_gate, offsets), self._gemm(x, w_up, offsets)
        hidden = self._swiglu(gate, up, self.limit)
        return self._gemm(hidden, w_down, offsets)

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        stacked = (self.w_gate, self.w_up, self.w_down)
        return self.step_casts.get(dtype, tuple(_local(w) for w in stacked))


class MoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        cfg: MoEConfig,
        kernel_backend: str,
        hash_table: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(hidden_size, cfg, hash_table, kernel_backend)
        self.experts = GroupedExperts(hidden_size, cfg, kernel_backend)
        shared_hidden = cfg.num_shared_experts * cfg.expert_ffn_hidden_size
        self.shared = None
        if cfg.num_shared_experts:  # V4 clamps its shared expert like the routed ones
            self.shared = SwiGLU(hidden_size, shared_hidden, cfg.swiglu_limit, kernel_backend)
        self._permute = kernels.get("moe_permute", kernel_backend)
        self._unpermute = kernels.get("moe_unpermute", kernel_backend)
        # Tokens routed to each expert since the last bias update (summed over micro-batches).
        zeros = lambda: torch.zeros(cfg.num_experts, dtype=torch.int64)  # noqa: E731
        constant(self, "tokens_per_expert", zeros, buffer=True, persistent=False)
        # When each rank holds only a part of every sequence (sequence parallelism, set from
        # outside), the sequence balance loss sums its per-sequence statistics over the parts.
        self.sequence_sum: Callable[[torch.Tensor], torch.Tensor] = _whole_sequences
        self.sequence_parts = 1
        self.sequence_index = 0  # which part of every sequence this rank holds
        self.skipped_positions = 0  # MTP depth k's layer sees the first T - k positions
        # Anticipatory Routing (set from outside, train/anticipatory.py): a list that every
        # forward appends its chosen experts to.
        self.route_record: list[torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        planned: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C), token ids (B, T) (needed by a hash layer) -> (output (B, T, C),
        sequence-wise balance loss (scalar)). Under sequence parallelism x holds this rank's
        part of every sequence and `token_ids` the whole sequences. `planned` (B, T, k): the
        experts Anticipatory Routing chose for these tokens."""
        flat = x.flatten(0, 1)
        if self.router.hash_table is not None:
            if token_ids.shape[1] != x.shape[1]:
                token_ids = token_ids.chunk(self.sequence_parts, dim=1)[self.sequence_index]
            token_ids = token_ids.flatten()
        planned = None if planned is None else planned.flatten(0, -2)
        weights, expert_ids, scores = self.router(flat, token_ids, planned)
        if self.route_record is not None:
            self.route_record.append(expert_ids.detach().to(torch.int16 if
                                     self.cfg.num_experts <= 2**15 else torch.int32))  # fmt: skip
        # The experts compute in autocast's dtype, as nn.Linear would (grouped_mm is none of
        # autocast's ops, and a plain residual stream's tokens arrive in float32): permuted so.
        tokens = flat.to(matmul_dtype(flat))
        permuted, order, counts = self._permute(tokens, expert_ids, self.cfg.num_experts)
        if self.training and not recomputing():
            self.tokens_per_expert += counts
        expert_out = self.experts(permuted, counts)
        out = self._unpermute(expert_out, order, weights, flat.shape[0])
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view_as(x), self._sequence_balance_loss(scores, expert_ids, x.shape[:2])

    def _sequence_balance_loss(
        self, scores: torch.Tensor, expert_ids: torch.Tensor, batch_seq: torch.Size
    ) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence, averaged over sequences (DeepSeek-V3 eq. 17-20)."""
        if self.cfg.seq_aux_loss_coef == 0:
            return scores.new_zeros(())
        batch, seq = batch_seq
        e, k = self.cfg.num_experts, self.cfg.top_k
        chosen = torch.zeros_like(scores).scatter(-1, expert_ids, 1.0).view(batch, seq, e)
        normalized = (scores / scores.sum(-1, keepdim=True)).view(batch, seq, e)
        # Per sequence and expert: tokens routed to it, and its summed normalized score.
        routed, score_sum = self.sequence_sum(torch.stack((chosen.sum(1), normalized.sum(1))))
        length = seq * self.sequence_parts
        fraction = routed * e / (k * length)  # f_i per sequence
        probability = score_sum / length  # P_i per sequence
        return self.cfg.seq_aux_loss_coef * (fraction * probability).sum(-1).mean()
