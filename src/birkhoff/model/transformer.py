"""Decoder-only transformer: embedding, blocks joined by (m)HC or plain residuals, head."""

from __future__ import annotations

import math

import torch
from torch import nn

from birkhoff import kernels
from birkhoff.model.attention import Attention
from birkhoff.model.budget import apply_sparse_budget
from birkhoff.model.config import ModelConfig
from birkhoff.model.context import SequenceContext, document_causal_mask
from birkhoff.model.engram import PAD_ID, Engram
from birkhoff.model.init import constant, initialise
from birkhoff.model.mhc import StreamReadout, build_residual, residual_chain
from birkhoff.model.mlp import SwiGLU
from birkhoff.model.moe import MoE, hash_routing_table
from birkhoff.model.mtp import MTPDepth, mtp_depths, mtp_loss
from birkhoff.model.norm import RMSNorm
from birkhoff.model.rope import rope_tables
from birkhoff.model.v4_attention import V4Attention

OUTPUT_PROJECTIONS = ("attention.wo", "attention.w_o", "ffn.w_down", "shared.w_down")


class Block(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        token_compression: torch.Tensor,
        kernel_backend: str,
        pad_id: int = PAD_ID,
    ) -> None:
        super().__init__()
        self.layer = layer
        streams = cfg.residual.streams
        self.engram = (
            Engram(
                cfg.hidden_size,
                streams,
                cfg.engram,
                layer,
                token_compression,
                kernel_backend,
                cfg.norm_eps,
                pad_id,
            )
            if layer in cfg.engram.layers
            else None
        )
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, kernel_backend)
        self.attention = _attention(cfg, layer, kernel_backend)
        self.attention_residual = build_residual(
            cfg.hidden_size, cfg.residual, kernel_backend, cfg.norm_eps
        )
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, kernel_backend)
        self.ffn: nn.Module = (
            MoE(cfg.hidden_size, cfg.moe, kernel_backend, hash_table_of(cfg, layer))
            if cfg.moe.is_moe_layer(layer)
            else SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size, kernel_backend=kernel_backend)
        )
        self.ffn_residual = build_residual(
            cfg.hidden_size, cfg.residual, kernel_backend, cfg.norm_eps
        )
        if isinstance(self.ffn, MoE):
            self.ffn.skipped_positions = max(0, layer - cfg.num_layers + 1)

    def forward(
        self,
        x: torch.Tensor,
        tokens: torch.Tensor,
        ctx: SequenceContext,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C) with plain residuals, (B, T, n, C) with n hyper-connection streams.
        Engram (if any) runs first. Returns the new residual and the block's auxiliary loss,
        if any: an MoE layer's sequence-wise balance loss plus a CSA layer's indexer loss
        (returned, not appended to an argument: FSDP and checkpoint wrappers may copy
        containers passed in)."""
        if self.engram is not None:
            rows = ctx.engram_rows.get(self.layer) if ctx.engram_rows else None
            x = self.engram(x, tokens, rows)
        aux: list[torch.Tensor] = []
        x = residual_chain(
            x,
            [
                (self.attention_residual, lambda h: self._attend(self.attention_norm(h), ctx, aux)),
                (self.ffn_residual, lambda h: self._ffn(self.ffn_norm(h), tokens, ctx, aux)),
            ],
        )
        return x, (sum(aux[1:], aux[0]) if aux else None)

    def _attend(
        self, h: torch.Tensor, ctx: SequenceContext, aux_losses: list[torch.Tensor]
    ) -> torch.Tensor:
        if isinstance(self.attention, V4Attention):
            return self.attention(h, ctx, aux_losses)
        return self.attention(h, ctx)

    def tensor_parallel_plan(self, sequence_parallel: bool = False) -> dict[str, str]:
        """Submodule -> role for tensor parallelism (applied from outside): attention heads and
        the hidden units of dense and shared-expert FFNs are split; a "colwise" layer feeds a
        "rowwise" one, so each sublayer needs one all-reduce. Norms, mHC mappings, Engram,
        router and routed experts stay whole (experts use ep instead).

        With `sequence_parallel` the residual between sublayers holds a slice of the sequence
        (dim 1): row-parallel outputs are reduce-scattered to it ("rowwise_seq"; "rowwise_tokens"
        along the flattened tokens the shared experts see), modules that mix positions gather
        their input first ("gather_seq", "gather_tokens"), and Engram, whose convolution reads
        earlier positions, runs on the whole sequence ("whole_seq"). Norms, mHC, router and
        routed experts then run on the slice."""
        if isinstance(self.attention, V4Attention):  # queries, output groups, indexer heads
            plan = {"attention.w_q_up": "colwise", "attention.w_o_groups": "colwise"}
            if self.attention.indexer is not None:
                plan["attention.indexer.w_q"] = plan["attention.indexer.w_weights"] = "colwise"
            output = "attention.w_o"
        else:
            plan = {f"attention.{name}": "colwise" for name in ("wq", "wk", "wv")}
            output = "attention.wo"
        plan[output] = "rowwise"
        outputs = {"attention": output}  # sublayer -> its row-parallel output layer
        ffn = self.ffn if isinstance(self.ffn, SwiGLU) else getattr(self.ffn, "shared", None)
        if ffn is not None:
            prefix = "ffn" if ffn is self.ffn else "ffn.shared"
            plan.update({f"{prefix}.w_gate": "colwise", f"{prefix}.w_up": "colwise"})
            plan[f"{prefix}.w_down"] = "rowwise"
            outputs[prefix] = f"{prefix}.w_down"
        if not sequence_parallel:
            return plan
        for sublayer, output in outputs.items():
            split = "tokens" if sublayer == "ffn.shared" else "seq"  # shared: (B*T, C) inputs
            plan[sublayer] = f"gather_{split}"
            plan[output] = f"rowwise_{split}"
        if isinstance(self.attention, V4Attention):  # its whole-sequence layers are not split
            plan["attention"] = "gather_seq_local"
        if self.engram is not None:
            plan["engram"] = "whole_seq"
        return plan

    def _ffn(
        self,
        h: torch.Tensor,
        tokens: torch.Tensor,
        ctx: SequenceContext,
        aux_losses: list[torch.Tensor],
    ) -> torch.Tensor:
        if not isinstance(self.ffn, MoE):
            return self.ffn(h)
        # self.layer read only where routes are planned: torch.compile guards on an int
        # attribute it reads, and every block compiled anew instead of sharing the code of
        # the blocks built alike (small's 12 blocks: over 4 minutes cold on an H200)
        routes = ctx.planned_routes.get(self.layer) if ctx.planned_routes else None
        out, balance_loss = self.ffn(h, tokens, routes)
        aux_losses.append(balance_loss)
        return out


def _attention(cfg: ModelConfig, layer: int, kernel_backend: str) -> nn.Module:
    if cfg.attention.kind == "gqa":
        return Attention(cfg, kernel_backend)
    layer_type = cfg.attention.layer_type(layer)
    return V4Attention(
        cfg.hidden_size,
        cfg.num_heads,
        cfg.attention,
        layer_type,
        cfg.norm_eps,
        cfg.rope_theta,
        kernel_backend,
    )


def hash_table_of(cfg: ModelConfig, layer: int) -> torch.Tensor | None:
    """A hash layer's token -> experts table, drawn from the seed and the layer index (on the
    CPU: also while a model is built on `meta`)."""
    if not cfg.moe.is_hash_layer(layer):
        return None
    seed = cfg.moe.hash_seed * 1_000_003 + layer
    return hash_routing_table(cfg.vocab_size, cfg.moe.num_experts, cfg.moe.top_k, seed)


class Transformer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        kernel_backend: str = "reference",
        token_compression: torch.Tensor | None = None,
        pad_id: int = PAD_ID,
    ) -> None:
        """`token_compression` maps vocabulary ids to Engram's canonical ids (identity if None);
        `pad_id` is the tokenizer's pad id, whose canonical id left-pads Engram's n-grams."""
        super().__init__()
        self.cfg = cfg
        if token_compression is None:
            token_compression = torch.arange(cfg.vocab_size, device="cpu")
        self.streams = cfg.residual.streams
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # Keyed by layer index: a pipeline stage keeps its layers under their original names.
        self.blocks = nn.ModuleDict(
            {
                str(i): Block(cfg, i, token_compression, kernel_backend, pad_id)
                for i in range(cfg.num_layers)
            }
        )
        self.readout = (
            None
            if cfg.residual.mode == "plain"
            else StreamReadout(cfg.hidden_size, cfg.residual, kernel_backend, cfg.norm_eps)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, kernel_backend)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._linear_loss = kernels.get("linear_cross_entropy", kernel_backend)
        self.mtp = nn.ModuleList(  # full blocks, numbered after the main ones
            MTPDepth(
                cfg,
                Block(cfg, cfg.num_layers + k, token_compression, kernel_backend, pad_id),
                kernel_backend,
            )
            for k in range(cfg.mtp.depth)
        )
        # the MTP loss's weight now (train/phase_schedules.py lowers it when the LR decays)
        self.mtp_loss_weight = cfg.mtp.loss_weight
        # Anticipatory Routing (set from outside, train/anticipatory.py): per micro-batch of
        # the step, in order, the experts of each MoE layer; training forwards take them in
        # turn (a pipeline stage runs its micro-batches' forwards in order too).
        self.planned_routes: list[dict[int, torch.Tensor]] | None = None
        self.planned_forwards = 0
        self.tie_weights()
        tables = lambda: rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # noqa: E731
        constant(self, "rope_cos", lambda: tables()[0], buffer=True, persistent=False)
        constant(self, "rope_sin", lambda: tables()[1], buffer=True, persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        engram_rows: dict[int, torch.Tensor] | None = None,
        next_token_only: bool = False,
        routes_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); with `targets`, the training objective
        (the mean next-token loss, plus the MTP and balance terms where enabled), or with
        `next_token_only` the next-token loss alone (evaluation: no logits kept whole), or
        with `routes_only` zero after running every MoE layer, the MTP depths' included, and
        no head (Anticipatory Routing's look-ahead only records the experts).

        `positions` (B, T) restart at 0 where a packed document starts: rotary embeddings use
        them and attention stays inside each document. `engram_rows` are Engram's table rows
        precomputed by the data loader. The loss is computed inside forward so that
        data-parallel wrappers see one call.
        """
        if routes_only and (targets is None or next_token_only):
            raise ValueError("routes_only runs the MTP depths on `targets`: pass them, alone")
        ctx = self.context(tokens.shape[1], positions, engram_rows)
        x, aux_losses = self.run_blocks(self.embed(tokens), tokens, ctx)
        if targets is None:
            return self.logits(x)
        if next_token_only:
            return self.output_loss(x, targets, ctx, None)
        target_embeddings = self.embedding(targets) if self.uses_mtp else None
        if routes_only:
            return self.route_mtp_depths(x, targets, ctx, target_embeddings)
        loss = self.output_loss(x, targets, ctx, target_embeddings)
        return loss + sum(aux_losses) if aux_losses else loss

    def run_blocks(
        self, x: torch.Tensor, tokens: torch.Tensor, ctx: SequenceContext
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The residual through every block held here, and the MoE balance losses they made."""
        aux_losses: list[torch.Tensor] = []
        for block in self.blocks.values():
            x, balance_loss = block(x, tokens, ctx)
            if balance_loss is not None:
                aux_losses.append(balance_loss)
        return x, aux_losses

    @property
    def uses_mtp(self) -> bool:
        return len(self.mtp) > 0 and self.cfg.mtp.loss_weight > 0

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the residual: (B, T, C), or (B, T, n, C) with n streams."""
        x = self.embedding(tokens)
        if self.has_streams:  # the embedding is copied into every stream (contiguous, or
            x = x.unsqueeze(-2).repeat(1, 1, self.streams, 1)  # matmuls take a slow path)
        return x

    @property
    def has_streams(self) -> bool:
        """Whether the residual is n hyper-connection streams (B, T, n, C)."""
        return self.cfg.residual.mode != "plain"

    def route_mtp_depths(
        self,
        x: torch.Tensor,
        targets: torch.Tensor,
        ctx: SequenceContext,
        target_embeddings: torch.Tensor | None,
    ) -> torch.Tensor:
        """Zero, after the MTP depths' blocks ran on the last blocks' residual `x` (their MoE
        layers route) without the shared head."""
        if self.uses_mtp:
            for _ in mtp_depths(self.mtp, x, targets, target_embeddings, ctx):
                pass
        return x.new_zeros((), dtype=torch.float32)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last blocks' residual -> logits (B, T, vocab)."""
        return self._logits(x if self.readout is None else self.readout(x))

    def output_loss(
        self,
        x: torch.Tensor,
        targets: torch.Tensor,
        ctx: SequenceContext,
        target_embeddings: torch.Tensor | None,
    ) -> torch.Tensor:
        """Next-token cross-entropy of the last blocks' residual, plus the weighted MTP loss
        and the MTP blocks' auxiliary losses while training (`target_embeddings` =
        Emb(targets), needed only then)."""
        hidden = x if self.readout is None else self.readout(x)
        loss = self.head_loss(self.norm(hidden), targets)
        if self.uses_mtp and target_embeddings is not None:
            extra, aux = mtp_loss(self.mtp, x, targets, target_embeddings, self.head_loss, ctx)
            loss = loss + self.mtp_loss_weight * extra + sum(aux)
        return loss

    def context(
        self,
        seq: int,
        positions: torch.Tensor | None,
        engram_rows: dict[int, torch.Tensor] | None,
    ) -> SequenceContext:
        """RoPE tables, document mask, Engram rows and the planned experts shared by every
        block of one call."""
        if self.cfg.attention.kind == "v4":  # rotates by its own tables, masks by positions
            ctx = SequenceContext(engram_rows=engram_rows, positions=positions)
        elif positions is None:
            ctx = SequenceContext(self.rope_cos[:seq], self.rope_sin[:seq], None, engram_rows)
        else:
            mask = document_causal_mask(positions)
            ctx = SequenceContext(
                self.rope_cos[positions], self.rope_sin[positions], mask, engram_rows
            )
        ctx.planned_routes = self._take_planned_routes()
        return ctx

    def _take_planned_routes(self) -> dict[int, torch.Tensor] | None:
        """A training forward's planned experts: the next micro-batch's (None without)."""
        if not self.training or self.planned_routes is None:
            return None
        if self.planned_forwards >= len(self.planned_routes):
            raise RuntimeError(
                f"{self.planned_forwards + 1} training forwards in a step that planned the "
                f"experts of {len(self.planned_routes)} micro-batches"
            )
        self.planned_forwards += 1
        return self.planned_routes[self.planned_forwards - 1]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))

    def head_loss(self, normed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the head's logits for `normed` (B, T, C) against `targets`
        (B, T), through the linear_cross_entropy op: the logits are never whole."""
        return self._linear_loss(normed.flatten(0, 1), self.head.weight, targets.flatten())

    def tie_weights(self) -> None:
        """With tie_embeddings, the head multiplies by the embedding itself (again after
        `to_empty`, which gives each module its own new tensor; FSDP keeps the tie itself)."""
        both = self.embedding is not None and self.head is not None
        if self.cfg.tie_embeddings and both and self.head.weight is not self.embedding.weight:
            self.head.weight = self.embedding.weight

    def init_weights(self, seed: int) -> None:
        """Give every tensor held here its initial value, the same for any layout (see
        model/init.py): Normal(0, init_std) for matrices, output projections (and the experts'
        down projections) scaled by 1/sqrt(2 * layers) (GPT-2); norm gains, biases, tables
        and Engram's zero convolution their constructor values."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)

        def std_of(name: str) -> float:
            module = name.rsplit(".", 1)[0]
            is_output = module.endswith(OUTPUT_PROJECTIONS) or name.endswith("experts.w_down")
            return out_std if is_output else std

        initialise(self, seed, std_of)


def build_model(
    cfg: ModelConfig,
    kernel_backend: str = "reference",
    token_compression: torch.Tensor | None = None,
    pad_id: int = PAD_ID,
    seed: int | None = None,
) -> Transformer:
    """Validate the config, size it from its sparse budget, construct it and, unless it is
    built on the meta device (to be sharded, then materialised by the caller), initialise it
    with `seed` (default: drawn from torch's global generator)."""
    cfg.validate()
    model = Transformer(apply_sparse_budget(cfg), kernel_backend, token_compression, pad_id)
    if model.embedding.weight.device.type != "meta":
        model.init_weights(int(torch.randint(2**62, ())) if seed is None else seed)
    return model
