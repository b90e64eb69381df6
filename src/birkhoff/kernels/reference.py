"""Plain-PyTorch reference implementations: correct everywhere, the baseline for every backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from birkhoff.kernels.opaque_grouped_mm import opaque_grouped_mm
from birkhoff.kernels.registry import REFERENCE, register


@register("rms_norm", REFERENCE)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in float32 and cast back to the input dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


@register("rope", REFERENCE)
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on (B, T, H, D) with cos/sin of shape (T, D/2), or (B, T, D/2) for
    per-sequence positions, rotating half-pairs."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos = cos.unsqueeze(-2) if cos.dim() == 3 else cos[None, :, None, :]
    sin = sin.unsqueeze(-2) if sin.dim() == 3 else sin[None, :, None, :]
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


@register("attention", REFERENCE)
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Grouped-query attention on (B, H, T, D) tensors; k/v may have fewer heads. Causal when
    `mask` is None, else `mask` (B, 1, T, T) bool says which keys each query sees."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _sinkhorn_log(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """exp(logits) projected toward the doubly stochastic matrices over the last two dims.

    Each iteration normalises columns, then rows, in log space (no overflow for any logits);
    the rows are therefore exact after the last iteration and the columns approximate. The
    matrices are laid out (n, n, batch) so each reduction runs over contiguous batch rows:
    3.7x faster than reducing the trailing 4-wide dimension (measured on 2048 4x4 matrices).
    """
    batch_shape, n = logits.shape[:-2], logits.shape[-1]
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    log_m = logits.to(compute_dtype).reshape(-1, n, n).permute(1, 2, 0).contiguous()
    for _ in range(iters):
        log_m = log_m - torch.logsumexp(log_m, dim=0, keepdim=True)
        log_m = log_m - torch.logsumexp(log_m, dim=1, keepdim=True)
    # Contiguous output: a permuted H_res sends the following matmul down a per-matrix slow path.
    matrices = log_m.exp().permute(2, 0, 1).contiguous()
    return matrices.view(*batch_shape, *logits.shape[-2:]).to(logits.dtype)


def _sinkhorn_eps(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """DeepSeek-V4's production Sinkhorn (inference/model.py) in our orientation (we apply
    H_res x; V4's `comb` is its transpose): a softmax down each column plus `eps`, rows
    normalised, then `iters - 1` times columns and rows, each sum taken as (sum + eps). In
    linear space: the softmax bounds every entry. Row sums end at s / (s + eps), not exactly 1.
    Laid out (n, n, batch) as `sinkhorn_knopp` is, for the same reason."""
    batch_shape, n = logits.shape[:-2], logits.shape[-1]
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    m = logits.to(compute_dtype).reshape(-1, n, n).permute(1, 2, 0).contiguous()
    m = torch.softmax(m, dim=0) + eps
    m = m / (m.sum(1, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(0, keepdim=True) + eps)
        m = m / (m.sum(1, keepdim=True) + eps)
    matrices = m.permute(2, 0, 1).contiguous()
    return matrices.view(*batch_shape, *logits.shape[-2:]).to(logits.dtype)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _RecomputedInBackward(torch.autograd.Function):
    """`fn(logits, *args)` with autograd keeping only `logits`: forward runs the iterations
    unrecorded, backward runs them again recorded and differentiates that (the mHC paper's
    recomputation, §4.3). Unrolled, autograd would keep every iteration's matrices and sums:
    2 x iters x (n^2 + n) floats per token and join, 2.7 KB of a join's 5.7 in the V4 tiny."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, fn, *args) -> torch.Tensor:
        ctx.fn, ctx.args = fn, args
        ctx.save_for_backward(logits)
        return fn(logits, *args)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        # The recomputed graph lives only inside this backward: no outer saved-tensor hook
        # (offloading, counting) is handed its tensors.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
            again = logits.detach().requires_grad_()
            (logits_grad,) = torch.autograd.grad(ctx.fn(again, *ctx.args), again, grad)
        return (logits_grad, None, *(None for _ in ctx.args))


def _recomputed_in_backward(logits: torch.Tensor, fn, *args) -> torch.Tensor:
    """Compiled code runs `fn` as it is: AOTAutograd's partitioner then chooses what backward
    recomputes (cheap elementwise chains like these iterations are what it recomputes), where
    eager autograd would keep every iteration."""
    if torch.compiler.is_compiling():
        return fn(logits, *args)
    return _RecomputedInBackward.apply(logits, fn, *args)


@register("sinkhorn_knopp", REFERENCE)
def sinkhorn_knopp(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """exp(logits) projected toward the doubly stochastic matrices over the last two dims:
    each iteration normalises columns, then rows, in log space (no overflow for any logits);
    the rows are therefore exact after the last iteration and the columns approximate.
    Backward recomputes the iterations instead of keeping them."""
    return _recomputed_in_backward(logits, _sinkhorn_log, iters)


@register("sinkhorn_knopp_eps", REFERENCE)
def sinkhorn_knopp_eps(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """DeepSeek-V4's production Sinkhorn (see _sinkhorn_eps); backward recomputes the
    iterations instead of keeping them."""
    return _recomputed_in_backward(logits, _sinkhorn_eps, iters, eps)


@register("mhc_pre", REFERENCE)
def mhc_pre(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Layer input from n streams: sum_i h_pre[i] * x_i. (B, T, n, C), (B, T, n) -> (B, T, C)."""
    return (h_pre.to(streams.dtype).unsqueeze(-2) @ streams).squeeze(-2)


@register("mhc_post", REFERENCE)
def mhc_post(
    streams: torch.Tensor, layer_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor
) -> torch.Tensor:
    """Next streams H_res x + h_post^T F(x): (B,T,n,C), (B,T,C), (B,T,n,n), (B,T,n) -> (B,T,n,C)."""
    # The residual streams keep their dtype (fp32) under autocast: a bf16 H_res x would round
    # the whole residual at every sublayer, which the plain residual x + F(x) never does.
    with torch.autocast(streams.device.type, enabled=False):
        mixed = h_res.to(streams.dtype) @ streams
        update = h_post.to(streams.dtype).unsqueeze(-1) * layer_out.to(streams.dtype).unsqueeze(-2)
        return mixed + update


# RMSNorm(v) phi without the normalised v: RMSNorm has no weight in mHC's mappings, so it equals
# (v phi) / rms(v), one matmul and one norm over v (the mHC paper's kernels reorder it the same
# way, section 4.3), and its backward is one matmul plus one scaled copy of v. As F.rms_norm then
# a linear layer, a `small` training step took 2.62 s against 2.26 s reordered (same process,
# alternating; 2-core CPU): the normalised n C vector and its gradient chain are several passes
# over the widest tensor of the block.
class _NormalisedProjection(torch.autograd.Function):
    """(v W^T) r with r = (mean(v^2) + eps)^(-1/2) per row of v (N, D); W (K, D)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
        scale = torch.rsqrt(norm.square() / flat.shape[-1] + eps)
        projected = flat @ weight.T
        ctx.save_for_backward(flat, weight, projected, scale)
        return projected * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        flat, weight, projected, scale = ctx.saved_tensors
        # float32 like the forward, even where backward runs inside an autocast region
        with torch.autocast(grad.device.type, enabled=False):
            grad_projected = grad * scale
            d_flat = d_weight = None
            if ctx.needs_input_grad[0]:  # through v W^T, and through r: dr/dv = -r^3 v / D
                through_scale = (grad * projected).sum(-1, keepdim=True) * scale.pow(3)
                d_flat = torch.addmm(
                    flat * (-through_scale / flat.shape[-1]), grad_projected, weight
                )
            if ctx.needs_input_grad[1]:
                d_weight = grad_projected.T @ flat
        return d_flat, d_weight, None


def normalised_projection(streams: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(vec(x)) W^T over the n C values of each token's streams x (..., n, C), in float32
    whatever the inputs and autocast: (..., K) for W (K, n C)."""
    with torch.autocast(streams.device.type, enabled=False):
        flat, weight = streams.flatten(-2).float(), weight.float()
        if torch.compiler.is_compiling():  # the same order, for inductor to fuse
            return (flat @ weight.T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
        rows = flat.reshape(-1, flat.shape[-1])
        projected = _NormalisedProjection.apply(rows, weight, eps)
        return projected.view(*flat.shape[:-1], weight.shape[0])


@register("mhc_mapping", REFERENCE)
def mhc_mapping(
    streams: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    bias_pre: torch.Tensor,
    bias_post: torch.Tensor,
    bias_res: torch.Tensor,
    norm_eps: float,
    iters: int,
    form_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC's three mappings of the n streams (B, T, n, C): x' = RMSNorm(vec(x)) (eps
    `norm_eps`), its projection x' phi (weight (2n + n^2, n C)) in float32 even under autocast
    (H_res feeds Sinkhorn, whose logits need the precision), then with alpha (3,) and biases
    (pre (n,), post (n,), res (n, n)):
        H_pre = sigmoid(a_pre x'phi_pre + b_pre)        (+ form_eps: V4's form)
        H_post = 2 sigmoid(a_post x'phi_post + b_post)
        H_res = Sinkhorn(a_res mat(x'phi_res) + b_res)  (V4's form: sinkhorn_knopp_eps).
    Returns (H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n)), float32."""
    n = streams.shape[-2]
    projected = normalised_projection(streams, weight, norm_eps)
    pre, post, res = projected.split([n, n, n * n], dim=-1)
    a_pre, a_post, a_res = alpha
    h_pre = torch.sigmoid(a_pre * pre + bias_pre)
    logits = a_res * res.unflatten(-1, (n, n)) + bias_res
    if form_eps is None:
        h_res = sinkhorn_knopp(logits, iters)
    else:
        h_pre, h_res = h_pre + form_eps, sinkhorn_knopp_eps(logits, iters, form_eps)
    return h_pre, 2 * torch.sigmoid(a_post * post + bias_post), h_res


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
    return tokens[order // expert_ids.shape[1]], order, tokens_per_expert(flat_ids, num_experts)


def tokens_per_expert(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) rows routed to each expert. Not bincount: its output length depends on the
    values, which compiled code cannot trace."""
    return flat_ids.new_zeros(num_experts).scatter_add_(0, flat_ids, torch.ones_like(flat_ids))


@register("moe_unpermute", REFERENCE)
def moe_unpermute(
    expert_out: torch.Tensor, order: torch.Tensor, gate_weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs back in token order: (N*k, C) -> (N, C)."""
    top_k = gate_weights.shape[1]
    weighted = expert_out * gate_weights.flatten()[order].unsqueeze(-1).to(expert_out.dtype)
    combined = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return combined.index_add(0, order // top_k, weighted)


@register("grouped_gemm", REFERENCE)
def grouped_gemm(x: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert times that expert's matrix: (M, K), (E, K, N), (E,) -> (M, N)."""
    offsets = counts.cumsum(0).to(torch.int32)
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
    return alpha.unsqueeze(-1).to(value.dtype) * value.unsqueeze(-2)


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
    normed_streams = F.rms_norm(streams.float(), (hidden,), eps=eps)
    normed_keys = F.rms_norm(keys.float(), (hidden,), eps=eps)
    similarity = (normed_streams * normed_keys).sum(-1) / hidden**0.5
    return torch.sigmoid(_signed_sqrt(similarity))
