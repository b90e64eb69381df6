"""Activation memory per token of one block: what autograd keeps for backward, term by term,
from the tensors the model code saves. Each term is tagged by how tensor parallelism divides
it ("heads": split over tp ranks; "stream": the residual side, split only with sequence
parallelism; "whole": never split) and whether it is a matmul output (selective activation
checkpointing keeps those and recomputes the rest)."""

from __future__ import annotations

from dataclasses import dataclass

from birkhoff.model.config import ModelConfig

FP32 = 4


@dataclass(frozen=True)
class Term:
    elements: float  # per token
    bytes_each: int
    split: str  # heads | stream | whole
    matmul: bool


def block_terms(
    cfg: ModelConfig, layer: int, seq: int, act_bytes: int, fused_attention: bool = False
) -> list[Term]:
    """The saved tensors of block `layer` per token, for sequences of `seq` tokens; with
    `fused_attention`, V4 attention keeps a log-sum-exp per head instead of its scores."""
    c, n = cfg.hidden_size, cfg.residual.n_streams
    terms: list[Term] = []
    for _ in range(2):  # attention and FFN sublayers: residual joins and their norms
        if cfg.residual.mode == "plain":
            terms.append(Term(c, FP32, "stream", False))
        else:
            iters = cfg.residual.sinkhorn_iters if cfg.residual.mode == "mhc" else 1
            terms.append(Term(2 * n * c + c + n * n * iters, FP32, "stream", False))
            terms.append(Term(2 * n + n * n, act_bytes, "stream", True))
        terms.append(Term(c, FP32, "stream", False))  # the norm's input
    terms += _attention_terms(cfg, layer, seq, act_bytes, fused_attention)
    terms += _ffn_terms(cfg, layer, act_bytes)
    if layer in cfg.engram.layers:
        e = cfg.engram
        rows = e.heads_per_order * (e.max_ngram - 1) * e.embed_dim
        terms.append(Term(rows, FP32, "whole", False))
        terms.append(Term(n * c + c, act_bytes, "whole", True))
        terms.append(Term(2 * n * c + 2 * c, FP32, "whole", False))
    return terms


def _attention_terms(cfg: ModelConfig, layer: int, seq: int, act: int, fused: bool) -> list[Term]:
    c, heads = cfg.hidden_size, cfg.num_heads
    a = cfg.attention
    if a.kind != "v4":
        d = c // heads
        qkv = heads * d + 2 * cfg.num_kv_heads * d
        return [
            Term(qkv, act, "heads", True),
            Term(qkv, act, "heads", False),  # rotated copies
            Term(heads * d, act, "heads", True),  # attention output (flash: no score matrix)
            Term(heads, FP32, "heads", False),  # log-sum-exp
            Term(c, act, "stream", True),
        ]
    kind = a.layer_type(layer)
    window = window_keys(a.sliding_window, seq)
    visible_entries = seq / 2 / (a.csa_ratio if kind == "csa" else a.hca_ratio)
    entries = {"sliding": 0.0, "csa": min(a.index_topk, visible_entries), "hca": visible_entries}
    keys = window + entries[kind] + 1  # window, compressed entries, the sink
    hd = heads * a.head_dim
    terms = [
        Term(2 * a.q_lora_rank, act, "whole", True),
        Term(hd, act, "heads", True),
        Term(2 * hd, FP32, "heads", False),  # normalised and rotated queries
        Term(3 * a.head_dim, act, "whole", True),
        # logits and probabilities (a fused kernel: the log-sum-exp)
        Term(heads if fused else 2 * heads * keys, FP32, "heads", True),
        Term(hd, act, "heads", True),
        Term(a.o_groups * a.o_lora_rank, act, "heads", True),
        Term(c, act, "stream", True),
    ]
    if kind != "sliding":
        width = 2 * a.head_dim if kind == "csa" else a.head_dim
        terms.append(Term(2 * width, act, "whole", True))
        terms.append(Term(2 * width, FP32, "whole", False))
    if kind == "csa":
        index_heads = a.index_heads
        terms.append(Term(index_heads * a.index_head_dim + index_heads, act, "heads", True))
        terms.append(Term(2 * index_heads * visible_entries, FP32, "heads", True))
    return terms


def window_keys(window: int, seq: int) -> float:
    """Keys a query of a causal sliding window sees, averaged over the `seq` positions."""
    if window >= seq:
        return (seq + 1) / 2
    return window - window * (window - 1) / (2 * seq)


def _ffn_terms(cfg: ModelConfig, layer: int, act: int) -> list[Term]:
    c, moe = cfg.hidden_size, cfg.moe
    if not moe.is_moe_layer(layer):
        f = cfg.ffn_hidden_size
        return [Term(3 * f, act, "heads", True), Term(c, act, "stream", True)]
    k, f = moe.top_k, moe.expert_ffn_hidden_size
    terms = [
        Term(2 * moe.num_experts, FP32, "stream", True),  # router logits and scores
        Term(k * c, act, "stream", False),  # tokens sorted by expert
        Term(3 * k * f, act, "stream", True),
        Term(k * c + c, act, "stream", True),
    ]
    if moe.num_shared_experts:
        shared = moe.num_shared_experts * f
        terms += [Term(3 * shared, act, "heads", True), Term(c, act, "stream", True)]
    return terms


def head_terms(cfg: ModelConfig, act: int) -> list[Term]:
    """The last stage's output: the final norm, the logits and their float32 log-softmax, and
    each MTP depth's projections and logits (its block is counted as a block)."""
    v, c = cfg.vocab_size, cfg.hidden_size
    terms = [
        Term(c, FP32, "whole", False),
        Term(v, act, "whole", True),
        Term(v, FP32, "whole", False),
    ]
    for _ in range(cfg.mtp.depth):
        terms += [Term(4 * c, act, "whole", True), Term(v, act, "whole", True)]
        terms.append(Term(v, FP32, "whole", False))
    return terms


def bytes_per_token(terms: list[Term], tp: int, sequence_parallel: bool, keep: str) -> float:
    """Bytes per token of `terms` on one tp rank; `keep`: all, matmul (selective activation
    checkpointing) or none."""
    total = 0.0
    for term in terms:
        if keep == "none" or (keep == "matmul" and not term.matmul):
            continue
        divide = (
            tp if term.split == "heads" or (term.split == "stream" and sequence_parallel) else 1
        )
        total += term.elements * term.bytes_each / divide
    return total
