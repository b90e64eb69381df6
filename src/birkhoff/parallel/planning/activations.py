"""Activation memory per token: what autograd keeps for backward, term by term, as the
reference kernels save it (counted tensor by tensor on the V4-style test model, one term per
saved tensor or group of them; a fused kernel that recomputes instead keeps less). Each term
is tagged by how tensor parallelism divides it ("heads": split over tp ranks; "stream": the
residual side, split only with sequence parallelism; "whole": never split) and whether it is
a matmul output (selective activation checkpointing keeps those and recomputes the rest).
Integer tensors count 8 bytes, masks 1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from birkhoff.kernels.linear_cross_entropy import chunk_tokens
from birkhoff.kernels.npu_indexer_loss import indexer_operator_takes
from birkhoff.kernels.npu_v4_attention import sparse_operator_takes
from birkhoff.kernels.v4_attention import picks_as_mask
from birkhoff.model.config import ModelConfig

if TYPE_CHECKING:  # inventory.py builds the model; this module only reads its config
    from birkhoff.parallel.planning.inventory import Inventory

FP32, INDEX, MASK, INT32 = 4, 8, 1, 4


@dataclass(frozen=True)
class Term:
    elements: float  # per token
    bytes_each: int
    split: str  # heads | stream | whole
    matmul: bool
    selective_only: bool = False  # kept only by selective checkpointing's matmul policy


def block_terms(
    cfg: ModelConfig,
    layer: int,
    seq: int,
    act_bytes: int,
    attention: str = "reference",
    tp: int = 1,
) -> list[Term]:
    """The saved tensors of block `layer` per token, for sequences of `seq` tokens, V4
    attention's as `attention` (layout.ATTENTION_ACTIVATIONS) keeps them. `tp`: the
    tensor-parallel degree, whose share of the heads decides CSA's form."""
    c = cfg.hidden_size
    terms: list[Term] = []
    for _ in range(2):  # attention and FFN sublayers: the residual join and the sublayer's norm
        terms += _join_terms(cfg, act_bytes)
        terms.append(Term(c + 1, FP32, "stream", False))  # norm input, 1 / rms
    terms += _attention_terms(cfg, layer, seq, act_bytes, attention, tp)
    terms += _ffn_terms(cfg, layer, act_bytes)
    if layer in cfg.engram.layers:
        terms += _engram_terms(cfg, act_bytes)
    return terms


def block_bytes(
    inv: Inventory,
    layer: int,
    seq: int,
    act_bytes: int,
    attention: str,
    tp: int,
    sequence_parallel: bool,
    keep: str,
) -> float:
    """`bytes_per_token` of block `layer`'s terms, computed once per inventory (`inv`, whose
    model the terms describe) and remembered in it."""
    key = ("block_bytes", layer, seq, act_bytes, attention, tp, sequence_parallel, keep)
    return inv.remembered(
        key,
        lambda: bytes_per_token(
            block_terms(inv.cfg, layer, seq, act_bytes, attention, tp),
            tp, sequence_parallel, keep,
        ),
    )  # fmt: skip


def stage_blocks(cfg: ModelConfig, layers: list[int], last: bool) -> list[int]:
    """The blocks a pipeline stage runs: its layers, and on the last stage every MTP depth's
    block (counted after the main layers)."""
    mtp = range(cfg.num_layers, cfg.num_layers + cfg.mtp.depth) if last else range(0)
    return [*layers, *mtp]


def _join_terms(cfg: ModelConfig, act: int) -> list[Term]:
    """One residual join. mHC keeps the n streams (their normalised flattening is never formed:
    kernels/mhc_reference.py's normalised_projection), the mapping projection (in float32), the
    sublayer output H_post scales, Sinkhorn's logits (its backward recomputes the iterations)
    and H_res; HC keeps tanh outputs instead."""
    c, n = cfg.hidden_size, cfg.residual.n_streams
    if cfg.residual.mode == "plain":
        return []
    mapping = 2 * n + n * n
    small = 2 * n * n + 4 * n + 1 if cfg.residual.mode == "mhc" else mapping
    return [
        Term(n * c, FP32, "stream", False),
        Term(mapping, FP32, "stream", True),
        Term(c, act, "stream", False),
        Term(small, FP32, "stream", False),
    ]


def _attention_terms(
    cfg: ModelConfig, layer: int, seq: int, act: int, attention: str, tp: int
) -> list[Term]:
    c, heads = cfg.hidden_size, cfg.num_heads
    a = cfg.attention
    if a.kind != "v4":
        d = c // heads
        qk = heads * d + cfg.num_kv_heads * d
        return [
            Term(c, act, "whole", False),  # the projections' input
            Term(cfg.num_kv_heads * d, act, "heads", True),  # values
            Term(qk, act, "heads", False),  # queries and keys rotated
            # RoPE keeps nothing of its input: q and k as projected are kept only where
            # selective checkpointing saves every matmul output
            Term(qk, act, "heads", True, selective_only=True),
            Term(heads * d, act, "heads", True),  # attention output (flash: no score matrix)
            Term(heads, FP32, "heads", False),  # log-sum-exp
        ]
    kind = a.layer_type(layer)
    window, d, hd = a.sliding_window, a.head_dim, heads * a.head_dim
    # Queries attend in blocks of `window` against two key blocks, whatever the sequence.
    count = seq / (a.csa_ratio if kind == "csa" else a.hca_ratio)
    # CSA attends to its picks as a mask over every entry where that keeps less than
    # gathering them: the kernel's rule (picks_as_mask) with the heads of one tp rank, fewer
    # of which can turn a gather into a mask
    masked = kind == "csa" and picks_as_mask(max(1, heads // tp), count, a.index_topk, d)
    entries = {"sliding": 0.0, "csa": count if masked else a.index_topk, "hca": count}[kind]
    keys = 2 * window + entries + 1  # window blocks, compressed entries, the sink
    fused = attention == "fused"
    terms = [
        Term(c, act, "whole", False),  # the projections' input
        Term(a.q_lora_rank, act, "whole", True),  # query latent, then normalised
        Term(a.q_lora_rank, FP32, "whole", False),
        Term(hd, act, "heads", True),  # queries, normalised, rotated, blocked
        Term(3 * hd, FP32, "heads", False),
        Term(heads if fused else heads * keys, FP32, "heads", False),  # probabilities
        Term(heads, FP32, "heads", False),
        Term(2 * window, MASK, "whole", False),
        Term(d, act, "whole", True),  # the KV entry, normalised, and the RoPE angles
        Term(3 * a.rope_head_dim / 2, FP32, "whole", False),
        Term(a.o_groups * a.o_lora_rank, act, "heads", True),  # grouped output projection
    ]
    if kind == "csa":
        topk, ih, id_ = a.index_topk, a.index_heads, a.index_head_dim
        if masked:  # every entry (and transposed) and which entries each query picked
            terms.append(Term(2 * d / a.csa_ratio, FP32, "whole", False))
            terms.append(Term(count, MASK, "whole", False))
        else:  # the picked entries in float32 (and as the values' dtype), their masks
            terms.append(Term(topk * d, FP32, "whole", False))
            if act != FP32:
                terms.append(Term(topk * d, act, "whole", False))
            terms.append(Term(2 * topk, FP32, "whole", False))
            terms.append(Term(3 * topk + 1, MASK, "whole", False))
        terms += _compressor_terms(2, a.csa_ratio, d)
        terms.append(Term(ih * id_, FP32, "heads", False))  # the indexer's queries, rotated
        if (
            attention == "npu"
            and tp == 1  # the operator sums all heads: one rank holds them
            and count < seq  # its causal layout
            and indexer_operator_takes(heads, ih, d, id_, _dtype(act), seq)
        ):
            terms += npu_indexer_loss_terms(ih, id_, a.csa_ratio, act)
        else:
            masked_index = picks_as_mask(max(1, ih // tp), count, topk, id_)
            terms += reference_indexer_loss_terms(ih, id_, count, topk, a.csa_ratio, masked_index)
        terms += _compressor_terms(2, a.csa_ratio, id_)
    elif kind == "hca":
        terms.append(Term(hd, FP32, "heads", False))  # queries against every entry
        terms.append(Term(entries, MASK, "whole", False))
        terms += _compressor_terms(1, a.hca_ratio, d)
    if attention == "npu" and (kind != "csa" or masked):  # the operator runs this layer
        ratio = a.csa_ratio if kind == "csa" else a.hca_ratio
        entries_seen = 0.0 if kind == "sliding" else count
        terms += _negated(reference_core_terms(heads, d, window, entries_seen, ratio, act))
        terms += npu_core_terms(heads, d, window, entries_seen, act)
    elif attention == "npu" and sparse_operator_takes(max(1, heads // tp), d, _dtype(act)):
        topk = a.index_topk
        gathered = reference_core_terms(heads, d, window, topk, a.csa_ratio, act, topk * d)
        terms += _negated(gathered)
        terms += npu_sparse_core_terms(heads, d, window, topk, a.csa_ratio, act)
    return terms


def reference_indexer_loss_terms(
    heads: int, dim: int, entries: float, picks: int, ratio: int, masked: bool
) -> list[Term]:
    """What the reference `indexer_loss` keeps per token (kernels/indexer_loss.py): the
    indexer's float32 queries and head weights; its scores per head before and after ReLU at
    every entry with every entry's score and the keys (`masked`), or at the picks with the
    picked keys gathered; the picks' indices; the KL's target and log-probabilities and its
    three masks at the picks and one per query."""
    if masked:
        scores = [Term(2 * heads * entries, FP32, "heads", False)]
        scores.append(Term(entries + dim / ratio, FP32, "whole", False))
    else:
        scores = [Term(2 * heads * picks, FP32, "heads", False)]
        scores.append(Term(picks * dim, FP32, "whole", False))
    return [
        Term(heads * dim + heads, FP32, "heads", False),
        *scores,
        Term(picks, INDEX, "whole", False),
        Term(2 * picks, FP32, "whole", False),
        Term(3 * picks + 1, MASK, "whole", False),
    ]


def npu_indexer_loss_terms(heads: int, dim: int, ratio: int, act: int) -> list[Term]:
    """What the npu backend's `indexer_loss` keeps per token (kernels/npu_indexer_loss.py):
    the gradients the operator gave in its forward, of the indexer's queries and head weights
    and of the keys (dim / ratio a token), in the activations' dtype."""
    return [Term(heads * dim + heads, act, "heads", False), Term(dim / ratio, act, "whole", False)]


def reference_core_terms(
    heads: int,
    dim: int,
    window: int,
    entries: float,
    ratio: int,
    act: int,
    entry_values: float | None = None,
) -> list[Term]:
    """What the reference `v4_attention` op itself keeps per token (kernels/v4_attention.py;
    `entries` per query seen as every entry, HCA's or CSA's picks as a mask, 0 in a sliding
    layer, or CSA's picks gathered): its float32 query blocks and window keys (and in a
    narrower dtype the keys as they are), the probabilities over every key and the sink, the
    window's in its dtype, the window mask; against entries the float32 queries, the entries
    in float32 (and as they are: `entry_values` per token, every entry's dim / ratio or the
    gathered picks' k dim), their mask and probabilities in its dtype."""
    hd = heads * dim
    entry_values = dim / ratio if entry_values is None else entry_values
    terms = [
        Term(hd, FP32, "heads", False),
        Term(2 * dim, FP32, "whole", False),
        Term(heads * (2 * window + entries + 1), FP32, "heads", False),
        Term(heads * 2 * window, act, "heads", False),
        Term(2 * window, MASK, "whole", False),
    ]
    if entries:
        terms += [
            Term(hd, FP32, "heads", False),
            Term(entry_values, FP32, "whole", False),
            Term(entries, MASK, "whole", False),
        ]
    if act != FP32:  # the keys and entries as they are, the entries' probabilities in act
        terms.append(Term(2 * dim, act, "whole", False))
        if entries:
            terms.append(Term(entry_values, act, "whole", False))
            terms.append(Term(heads * entries, act, "heads", False))
    return terms


def npu_core_terms(heads: int, dim: int, window: int, entries: float, act: int) -> list[Term]:
    """What the npu backend's V4 attention keeps per token (kernels/npu_v4_attention.py,
    torch_npu's autograd node for npu_fusion_attention_v2): the query blocks and the output,
    the blocks' keys (2W + E of them per W queries), their mask, and per head the operator's
    max and sum (8 copies each) and the normaliser."""
    keys = 2 * window + entries
    return [
        Term(2 * heads * dim, act, "heads", False),
        Term(keys * dim / window, act, "whole", False),
        Term(keys, MASK, "whole", False),
        Term(17 * heads, FP32, "heads", False),
    ]


def npu_sparse_core_terms(
    heads: int, dim: int, window: int, picks: int, ratio: int, act: int
) -> list[Term]:
    """What the npu backend's gathered CSA keeps per token (kernels/npu_v4_attention.py
    `_SparseAttention`): the queries and the output, the key rows (the tokens' and the
    entries', dim + dim / ratio), each query's list of W + k rows (int32) and per head the
    max, the sum with the sink and the normaliser (float32)."""
    return [
        Term(2 * heads * dim, act, "heads", False),
        Term(dim + dim / ratio, act, "whole", False),
        Term(window + picks, INT32, "whole", False),
        Term(3 * heads, FP32, "heads", False),
    ]


def _dtype(act: int) -> torch.dtype:
    """The activations' dtype from their bytes (2: bf16, the recipes' mixed precision)."""
    return torch.bfloat16 if act == 2 else torch.float32


def _negated(terms: list[Term]) -> list[Term]:
    """The terms taken out: what another implementation keeps instead."""
    return [Term(-t.elements, t.bytes_each, t.split, t.matmul) for t in terms]


def _compressor_terms(width: int, ratio: int, dim: int) -> list[Term]:
    """A compressor over windows of `width` x `ratio` tokens per entry of `dim` values."""
    return [
        Term(2 * width * dim + 2 * width + dim / ratio, FP32, "whole", False),
        Term(4, INDEX, "whole", False),
    ]


def _ffn_terms(cfg: ModelConfig, layer: int, act: int) -> list[Term]:
    c, moe = cfg.hidden_size, cfg.moe
    if not moe.is_moe_layer(layer):
        f = cfg.ffn_hidden_size
        # the input, gate and up (matmuls), silu(gate) and the product
        return [Term(c, act, "whole", False), *_swiglu_terms(f, act, False, "heads")]
    k, f = moe.top_k, moe.expert_ffn_hidden_size
    clamped = moe.swiglu_limit is not None and moe.swiglu_limit > 0
    terms = [
        Term(c + 2 * moe.num_experts + k + 1, FP32, "stream", False),  # router in, logits
        Term(3 * k, INDEX, "stream", False),  # picks and the sort by expert
        Term(k, FP32, "stream", False),
        Term(2 * k * c, act, "stream", False),  # tokens sorted by expert
        *_swiglu_terms(k * f, act, clamped, "stream"),
        Term(k * c, act, "stream", True),  # expert outputs before their gate weights
    ]
    if moe.num_shared_experts:
        terms += _swiglu_terms(moe.num_shared_experts * f, act, clamped, "heads")
    return terms


def _swiglu_terms(width: float, act: int, clamped: bool, split: str) -> list[Term]:
    """gate and up (matmul outputs), their clamped copies (V4's limit), silu and product."""
    others = (4 if clamped else 2) * width
    return [Term(2 * width, act, split, True), Term(others, act, split, False)]


def _engram_terms(cfg: ModelConfig, act: int) -> list[Term]:
    """The gathered memory, its row ids, the key and value projections and the gate, norm
    and causal convolution the reference kernel runs per stream (the convolution keeps only
    its input: kernels/causal_conv.py)."""
    c, n, e = cfg.hidden_size, cfg.residual.streams, cfg.engram
    heads = e.hash_heads
    return [
        Term(heads * e.embed_dim, FP32, "whole", False),
        Term(heads, INDEX, "whole", False),
        Term(n * c + c, act, "whole", True),
        Term(4 * n * c + 9 * n, FP32, "whole", False),
    ]


def head_terms(cfg: ModelConfig, act: int) -> list[Term]:
    """The last stage's outputs: the readout of the streams, the final norm and the gradient
    of the head's input that the linear_cross_entropy op keeps in its place (float32, like the
    input); each MTP depth adds its norms, projections and readout (its block is counted as a
    block). The logits are never kept (kernels/linear_cross_entropy.py)."""
    c, n = cfg.hidden_size, cfg.residual.streams
    # the streams (n C) and the mapping's few floats: its RMSNorm is folded behind the projection
    readout = n * c + 13 if cfg.residual.mode != "plain" else 0
    terms = [Term(readout + 3 * c + 1, FP32, "whole", False)]
    for _ in range(cfg.mtp.depth):
        terms += [Term(readout + 3 * c + n * c, FP32, "whole", False)]
    return terms


def head_weight_gradient_bytes(cfg: ModelConfig, weight_bytes: int) -> float:
    """Per micro-batch on the last stage: the head's weight gradient that each loss (the main
    one and every MTP depth's) computes in its forward and keeps until its backward, in the
    weight's dtype (`weight_bytes`: FSDP's gathered parameters', else float32)."""
    return (1 + cfg.mtp.depth) * cfg.vocab_size * cfg.hidden_size * weight_bytes


def loss_transient_bytes(cfg: ModelConfig, act: int, tokens: int, weight_bytes: int) -> float:
    """What one loss holds beyond the saved tensors at its peak: in its forward a chunk's
    logits (float32, reused for their gradient; under mixed precision also the logits and
    their gradient in the activation dtype) and, for a weight kept in another dtype than
    float32, the float32 sum of its gradient; in its backward the kept gradients times the
    loss's gradient (new tensors: the head's weight's and the hidden states')."""
    v, c = cfg.vocab_size, cfg.hidden_size
    chunk = min(tokens, chunk_tokens(v))
    forward = chunk * v * (FP32 + (2 * act if act != FP32 else 0))
    forward += FP32 * v * c if weight_bytes != FP32 else 0
    return max(forward, v * c * weight_bytes + tokens * c * FP32)


def bytes_per_token(terms: list[Term], tp: int, sequence_parallel: bool, keep: str) -> float:
    """Bytes per token of `terms` on one tp rank; `keep`: all, matmul (selective activation
    checkpointing) or none."""
    total = 0.0
    for term in terms:
        if keep == "none" or (keep == "matmul" and not term.matmul):
            continue
        if term.selective_only and keep != "matmul":
            continue
        divide = (
            tp if term.split == "heads" or (term.split == "stream" and sequence_parallel) else 1
        )
        total += term.elements * term.bytes_each / divide
    return total


def window_keys(window: int, seq: int) -> float:
    """Keys a query of a causal sliding window sees, averaged over the `seq` positions (the
    useful work; the blocked kernel computes 2 x window)."""
    if window >= seq:
        return (seq + 1) / 2
    return window - window * (window - 1) / (2 * seq)
