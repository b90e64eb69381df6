"""Plain-PyTorch reference implementations: correct everywhere, the baseline for every backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from birkhoff.kernels.causal_conv import causal_conv
from birkhoff.kernels.mhc_reference import (  # noqa: F401  (registered there, re-exported)
    mhc_mapping,
    mhc_merge_read,
    mhc_post,
    mhc_pre,
    mhc_read,
    normalised_projection,
    sinkhorn_knopp,
    sinkhorn_knopp_eps,
)
from birkhoff.kernels.opaque_grouped_mm import opaque_grouped_mm
from birkhoff.kernels.registry import REFERENCE, register
from birkhoff.kernels.rotation import rotate_trailing
from birkhoff.kernels.row_functions import (
    gated_value,
    normalised_similarity,
    rms_norm_rows,
    rms_normalised,
)


@register("rms_norm", REFERENCE)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in float32 (at least) and cast back to the
    input dtype; eager backward written out (kernels/row_functions.py)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    return rms_norm_rows(x.to(compute), weight.to(compute), eps).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of one (B, T, H, D) tensor with cos/sin of shape (T, D/2), or
    (B, T, D/2) for per-sequence positions, rotating half-pairs in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos = cos.unsqueeze(-2) if cos.dim() == 3 else cos[None, :, None, :]
    sin = sin.unsqueeze(-2) if sin.dim() == 3 else sin[None, :, None, :]
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


@register("rope", REFERENCE)
def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (B, T, H, D), each rotated by `rotate` (a fused backend rotates both in
    one launch)."""
    return rotate(q, cos, sin), rotate(k, cos, sin)


@register("rope_trailing", REFERENCE)
def rope_trailing(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool = False,
    norm_eps: float | None = None,
) -> torch.Tensor:
    """V4's interleaved RoPE (kernels/rotation.py): the adjacent channel pairs of x's last
    2 * cos.shape[-1] channels turned by the angles of cos/sin (broadcast over x's other
    dims), undone where `inverse`; the leading channels pass. With `norm_eps`, each row of x
    (its last dim) is first RMS-normalised without a weight, in float32 and back to x's
    dtype (V4's per-head query norm: fused backends do both in one pass)."""
    if norm_eps is not None:
        x = rms_normalised(x, norm_eps)
    return rotate_trailing(x, cos, -sin if inverse else sin)


@register("attention", REFERENCE)
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Grouped-query attention on (B, H, T, D) tensors; k/v may have fewer heads. Causal when
    `mask` is None, else `mask` (B, 1, T, T) bool says which keys each query sees."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def swiglu_clamp(
    gate: torch.Tensor, up: torch.Tensor, limit: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """V4's SwiGLU clamp (`limit` 10 in its configs; None: none): the gate capped at `limit`
    from above and the linear part clipped to [-limit, limit], which bounds what one expert
    can add to the residual stream. Every backend's `swiglu` applies it first."""
    if limit is None:
        return gate, up
    return gate.clamp(max=limit), up.clamp(-limit, limit)


@register("swiglu", REFERENCE)
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up, after V4's clamp (swiglu_clamp)."""
    gate, up = swiglu_clamp(gate, up, limit)
    return F.silu(gate) * up


@register("moe_permute", REFERENCE)
def moe_permute(
    tokens: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of each token for each of its k experts, grouped by expert.

    tokens (N, C), expert_ids (N, k) -> permuted (N*k, C), order (N*k,) (the flat slot each row
    came from: token = order // k), tokens per expert (E,).
    """
    flat_ids = expert_ids.flatten()
    order = flat_ids.argsort(stable=True)
    # index_select, not tokens[rows]: its backward is an index_add, where indexing's is an
    # accumulating index_put that sorts the rows first (10x slower on a CPU at tiny's shape)
    rows = tokens.index_select(0, order // expert_ids.shape[1])
    return rows, order, tokens_per_expert(flat_ids, num_experts)


def tokens_per_expert(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) rows routed to each expert: one bincount (the ids are below E, so its length is
    E), but in compiled code, which cannot trace a length that depends on the values."""
    if torch.compiler.is_compiling():
        ones = torch.ones_like(flat_ids)
        return flat_ids.new_zeros(num_experts).scatter_add_(0, flat_ids, ones)
    return torch.bincount(flat_ids, minlength=num_experts)


@register("moe_unpermute", REFERENCE)
def moe_unpermute(
    expert_out: torch.Tensor, order: torch.Tensor, gate_weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs back in token order: (N*k, C) -> (N, C)."""
    top_k = gate_weights.shape[1]
    gates = gate_weights.flatten().index_select(0, order)  # as moe_permute: an index_add back
    weighted = expert_out * gates.unsqueeze(-1).to(expert_out.dtype)
    combined = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return combined.index_add(0, order // top_k, weighted)


def group_ends(counts: torch.Tensor) -> torch.Tensor:
    """The rows per expert summed, in int32 (grouped_gemm's `offsets`): made once a layer for
    its three GEMMs, where each made them."""
    return counts.cumsum(0, dtype=torch.int32)


@register("grouped_gemm", REFERENCE)
def grouped_gemm(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert times that expert's matrix: (M, K), (E, K, N) -> (M, N), the
    groups ending at `offsets` (E,) int32, the rows per expert summed (`group_ends`)."""
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return opaque_grouped_mm(x, weights, offsets)  # the traced shape function is bf16-only
    return F.grouped_mm(x, weights, offs=offsets)


@register("engram_hash", REFERENCE)
def engram_hash(
    compressed: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    offsets: torch.Tensor,
    pad_id: int,
) -> torch.Tensor:
    """Row indices of every Engram head for every position.

    compressed (B, T) canonical ids; multipliers (N,) odd int64 (m_0 for the current token);
    primes and offsets (N-1, K) for orders n = 2..N. For order n, mix_t = XOR_{j<n} x_{t-j} m_j
    (int64, wrapping), left-padded with `pad_id`; the head's row is mix mod p + offset.
    Returns (B, T, (N-1) K) int64.
    """
    max_order = multipliers.shape[0]
    padded = F.pad(compressed, (max_order - 1, 0), value=pad_id)
    seq = compressed.shape[1]
    mix = torch.zeros_like(compressed)
    heads = []
    for j in range(max_order):
        shifted = padded[:, max_order - 1 - j : max_order - 1 - j + seq]
        mix = torch.bitwise_xor(mix, shifted * multipliers[j])
        if j >= 1:  # mix now covers the n = j + 1 most recent tokens
            heads.append(torch.remainder(mix.unsqueeze(-1), primes[j - 1]) + offsets[j - 1])
    return torch.cat(heads, dim=-1)


def _signed_sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.sqrt(x.abs().clamp_min(1e-6))  # finite gradient at 0


@register("engram_gather_gate", REFERENCE)
def engram_gather_gate(
    table: torch.Tensor,
    indices: torch.Tensor,
    key_weight: torch.Tensor,
    value_weight: torch.Tensor,
    streams: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Gather the n-gram rows and gate the shared value per stream.

    table (rows, d); indices (B, T, H); key_weight (n*C, H*d) (one key projection per stream);
    value_weight (C, H*d); streams (B, T, n, C). e = concat of rows; per stream m:
    alpha_m = sigmoid(signed_sqrt(<RMSNorm(h_m), RMSNorm(W_K^m e)> / sqrt(C))); returns
    alpha_m * W_V e of shape (B, T, n, C).
    """
    memory, value = engram_memory(table, indices, value_weight)
    alpha = engram_gate(memory, key_weight, streams, eps)
    return gated_value(alpha, value)


def engram_memory(
    table: torch.Tensor, indices: torch.Tensor, value_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated rows e (B, T, H*d) and the shared value W_V e (B, T, C)."""
    memory = F.embedding(indices, table).flatten(-2)
    return memory, F.linear(memory, value_weight)


def engram_gate(
    memory: torch.Tensor, key_weight: torch.Tensor, streams: torch.Tensor, eps: float
) -> torch.Tensor:
    """alpha (B, T, n) of the concatenated rows `memory` (B, T, H*d) for streams (B, T, n, C)."""
    n, hidden = streams.shape[-2], streams.shape[-1]
    keys = F.linear(memory, key_weight).unflatten(-1, (n, hidden))
    compute = torch.promote_types(streams.dtype, torch.float32)
    similarity = normalised_similarity(streams.to(compute), keys.to(compute), eps)
    return torch.sigmoid(_signed_sqrt(similarity))


def composed_merge(norm):
    """The `engram_merge` op of a backend with its own `rms_norm`: the reference's gate, the
    norm, the convolution and the sum (a backend that fuses them registers its own)."""

    def engram_merge(
        table: torch.Tensor,
        indices: torch.Tensor,
        key_weight: torch.Tensor,
        value_weight: torch.Tensor,
        streams: torch.Tensor,
        norm_weight: torch.Tensor,
        conv_weight: torch.Tensor,
        dilation: int,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An Engram layer's output streams (B, T, n, C) and its gates alpha (B, T, n) (in
        float32 at least, no gradient: what the training statistics read). With g the value
        gated as engram_gather_gate gates it, the output is streams + g + SiLU(Conv(RMSNorm(g)))
        where RMSNorm has weight norm_weight (C,) and Conv is causal and depthwise over time,
        conv_weight (lags, C), lag i reading i * dilation tokens back."""
        memory, value = engram_memory(table, indices, value_weight)
        alpha = engram_gate(memory, key_weight, streams, eps)
        gated = gated_value(alpha, value)
        normed = norm(gated, norm_weight, eps)
        out = streams + gated + F.silu(causal_conv(normed, conv_weight, dilation))
        return out, alpha.detach()

    return engram_merge


engram_merge = register("engram_merge", REFERENCE)(composed_merge(rms_norm))
