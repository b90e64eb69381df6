"""The `npu` backend: hot ops as torch_npu's fused Ascend operators, with the reference's
semantics (kernels/reference.py).

torch_npu is imported when an op runs, not when this module is imported: the ops register
everywhere (the registry lists what the backend would run), and the backend is available only
where torch_npu imports (it needs CANN). Every call's arguments are checked against the
signatures documented in the torch_npu wheel that pairs with torch 2.13
(tests/test_npu_backend.py reads torch_npu/_op_plugin_docs.py from the wheel), and the ops run
here against a stand-in torch_npu that computes what those docs specify.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch

from birkhoff.kernels.reference import (
    composed_merge,
    swiglu_clamp,
    tokens_per_expert,
)
from birkhoff.kernels.registry import register
from birkhoff.kernels.row_functions import rms_normalised

NPU = "npu"


def _torch_npu() -> ModuleType:
    """torch_npu, imported when an op runs (it needs CANN); every npu module calls it so."""
    return importlib.import_module("torch_npu")


@register("rms_norm", NPU)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """npu_rms_norm: (y, 1 / rms); gamma in the input's dtype, as the op requires."""
    y, _ = _torch_npu().npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)
    return y


# Engram's merge with npu_rms_norm for its RMSNorm (the gate and the convolution: the reference's)
register("engram_merge", NPU)(composed_merge(rms_norm))


def _rotary_mul(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """npu_rotary_mul in `half` mode on (B, T, H, D) (layout BSND): r1 * x + r2 * cat(-x2, x1),
    so r1 = cat(cos, cos) and r2 = cat(sin, sin) broadcast over heads (1S1D, or BS1D for
    per-sequence positions)."""
    r1, r2 = (torch.cat((t, t), dim=-1).to(x.dtype) for t in (cos, sin))
    if r1.dim() == 2:  # (T, D): one table for every sequence
        r1, r2 = r1[None, :, None, :], r2[None, :, None, :]
    else:  # (B, T, D)
        r1, r2 = r1[:, :, None, :], r2[:, :, None, :]
    return _torch_npu().npu_rotary_mul(x, r1, r2, rotary_mode="half")


@register("rope", NPU)
def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys, one npu_rotary_mul each."""
    return _rotary_mul(q, cos, sin), _rotary_mul(k, cos, sin)


@register("rope_trailing", NPU)
def rope_trailing(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse: bool = False,
    norm_eps: float | None = None,
) -> torch.Tensor:
    """npu_rotary_mul in `interleave` mode on x's last 2P channels (layout BSND; a 3-d x as
    one head): r1 * x + r2 * (-x_odd, x_even) pair by pair, so r1 and r2 are cos and sin with
    each value repeated for its pair. Its tables must be 1S1D there: one sequence's angles for
    every head, so packed rows (positions restarting per document) take a call each."""
    if norm_eps is not None:  # the per-head query norm: the reference's, then the turn
        x = rms_normalised(x, norm_eps)
    torch._check(
        cos.dim() == x.dim() and (x.dim() == 3 or cos.shape[2] == 1),
        lambda: (
            f"the npu rope_trailing takes a token's angles for all its heads: cos "
            f"{tuple(cos.shape)} for x {tuple(x.shape)}"
        ),
    )
    width = 2 * cos.shape[-1]
    heads = x[..., -width:] if x.dim() == 4 else x[..., -width:].unsqueeze(2)
    tables = [t if x.dim() == 4 else t.unsqueeze(2) for t in (cos, -sin if inverse else sin)]
    r1, r2 = (t.repeat_interleave(2, dim=-1).to(x.dtype) for t in tables)
    rows = [slice(None)] if r1.shape[0] == 1 else [slice(b, b + 1) for b in range(x.shape[0])]
    turned = torch.cat(
        [
            _torch_npu().npu_rotary_mul(
                heads[row].contiguous(), r1[row], r2[row], rotary_mode="interleave"
            )
            for row in rows
        ]
    )
    turned = turned if x.dim() == 4 else turned.squeeze(2)
    return torch.cat((x[..., :-width], turned), dim=-1)


@register("attention", NPU)
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """npu_fusion_attention on (B, H, T, D) (layout BNSD; k and v may have fewer heads). Its
    atten_mask is True where a key is hidden, the reverse of ours: causal is the upper
    triangle (SS), a document mask (B, 1, T, T) is inverted (B1SS)."""
    seq = q.shape[2]
    if mask is None:
        hidden = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    else:
        hidden = ~mask
    out = _torch_npu().npu_fusion_attention(
        q,
        k,
        v,
        q.shape[1],
        "BNSD",
        atten_mask=hidden,
        scale=1.0 / math.sqrt(q.shape[-1]),
        keep_prob=1.0,
        sparse_mode=0,
    )
    return out[0]


@register("grouped_gemm", NPU)
def grouped_gemm(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """npu_grouped_matmul grouping x's rows (m axis, group_type 0) by the cumulative counts
    (group_list_type 0; int64, which its docs require: a cast of the int32 `offsets`) against
    one (E, K, N) weight tensor, one output tensor (split_item 3)."""
    (out,) = _torch_npu().npu_grouped_matmul(
        [x],
        [weights],
        group_list=offsets.long(),
        split_item=3,
        group_type=0,
        group_list_type=0,
    )
    return out


@register("swiglu", NPU)
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """npu_swiglu on [gate | up] along the last dimension (its A and B halves); V4's clamp,
    which the op lacks, is applied to the halves first."""
    gate, up = swiglu_clamp(gate, up, limit)
    return _torch_npu().npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)


@register("moe_permute", NPU, dtypes=(torch.bfloat16,))
def moe_permute(
    tokens: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """npu_moe_token_permute: each token copied to its k experts' rows, sorted by expert (a
    stable sort, as the reference), and the sorted flat slots (int32); bfloat16 tokens only,
    as the op documents. Keeping every row: num_out_tokens = N k."""
    permuted, order = _torch_npu().npu_moe_token_permute(
        tokens, expert_ids, num_out_tokens=expert_ids.numel()
    )
    return permuted, order, tokens_per_expert(expert_ids.flatten(), num_experts)


@register("moe_unpermute", NPU, dtypes=(torch.bfloat16,))
def moe_unpermute(
    expert_out: torch.Tensor, order: torch.Tensor, gate_weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """npu_moe_token_unpermute: each token's k rows (found through the sorted slots) times
    its probs, summed; the gate weights in the rows' dtype (bfloat16), as the reference
    multiplies them."""
    if gate_weights.shape[0] != num_tokens:
        raise ValueError(f"gate_weights has {gate_weights.shape[0]} rows for {num_tokens} tokens")
    probs = gate_weights.to(expert_out.dtype)
    return _torch_npu().npu_moe_token_unpermute(expert_out, order, probs=probs)
