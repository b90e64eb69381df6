"""DeepSeek-V4's attention core (`v4_attention`, kernels/v4_attention.py) on the `npu` backend
through torch_npu's `npu_fusion_attention_v2`: FlashAttention on the Ascend cube units, with a
learned sink logit per head in its softmax (its docs: m = max(sink, max S), out = e^(S - m) V /
(sum e^(S - m) + e^(sink - m))) and its backward through torch_npu's autograd.

The reference's blocks become the operator's batch: each block of `window` queries attends to
the keys of its own block and the one before it (the window) followed by the layer's
compressed entries, one softmax over all of them and the sink; a (blocks, 1, W, 2W + E) mask
hides what a query may not see (outside its window or document, an entry not yet complete or
not picked). The key-value entries are keys and values at once and shared by the heads (one
KV head: the operator's GQA). Nothing T x T and no logits are kept: the operator keeps its
output and per row and head its max and sum (8 copies each, its layout).

The normaliser (the CSA indexer's target needs it) is the operator's softmax_max +
log(softmax_sum), whose sum includes the sink (the backward recomputes the probabilities from
the two). The sink's gradient is computed here, -sum over rows of p_sink (dout . out) with
p_sink = exp(sink - lse): the operator is handed the sink detached, so its autograd, whatever
it gives the sink, adds nothing.

Limits (the reference runs otherwise; the table says so): CSA's picks where the reference
itself attends them as a mask over every entry (`picks_as_mask`: up to about 10K tokens at
V4-Flash's shape); longer sequences' gathered picks run the reference, whose gather holds k
entries a query where the mask would hold every entry for every block of queries, and whose
work is k keys a query, not E. Every query sees itself (positions >= 0, as the model's are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from birkhoff.kernels import v4_attention as reference
from birkhoff.kernels.npu_ops import NPU, _torch_npu
from birkhoff.kernels.registry import register

DOT_FLOATS = 1 << 24  # float32 values of a block of rows in the sinks' gradient (64 MiB)
LIMITS = "CSA's picks as a mask only (picks_as_mask; the gathered form runs the reference)"


@register("v4_attention", NPU, limits=LIMITS)
def v4_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    positions: torch.Tensor,
    sinks: torch.Tensor,
    window: int,
    entries: reference.EntryKV | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's op (same arguments and outputs: (B, T, H, D) in kv's dtype, and the
    normaliser (B, T, H) float32, detached) as one npu_fusion_attention_v2 call."""
    batch, seq, heads, dim = q.shape
    gathered = entries is not None and not entries.as_mask(heads, dim)
    if gathered or batch * seq == 0:  # the operator: B, S >= 1
        return reference.v4_attention(q, kv, positions, sinks, window, entries)
    blocks_q = reference.query_blocks(q.to(kv.dtype), window)  # (B, nb, W, H, D)
    blocks = blocks_q.shape[1]
    keys = reference.window_keys(kv, window)  # (B, nb, 2W, D)
    allowed = reference.window_allowed(positions, window)  # (B, nb, W, 2W)
    if entries is not None:
        # the entries each query sees; none for the padding queries past T
        seen = F.pad(entries.seen(positions), (0, 0, 0, blocks * window - seq))
        values = entries.values.to(kv.dtype)[:, None].expand(-1, blocks, -1, -1)
        keys = torch.cat((keys, values), dim=2)
        allowed = torch.cat((allowed, seen.view(batch, blocks, window, -1)), dim=-1)
    out, largest, sums, *_ = _torch_npu().npu_fusion_attention_v2(
        blocks_q.flatten(0, 1),  # BSND: a block of W queries, H heads
        keys.flatten(0, 1)[:, :, None],  # one KV head
        keys.flatten(0, 1)[:, :, None],
        heads,
        "BSND",
        atten_mask=~allowed.flatten(0, 1)[:, None],  # True: hidden
        scale=dim**-0.5,
        keep_prob=1.0,
        sparse_mode=0,
        sink=sinks.detach().float(),
    )
    lse = (largest[..., 0] + sums[..., 0].log()).detach()  # (B nb, H, W)
    lse = lse.view(batch, blocks, heads, window).transpose(2, 3).flatten(1, 2)[:, :seq]
    out = out.reshape(batch, blocks * window, heads, dim)[:, :seq]
    return _SinkGradient.apply(out, sinks, lse), lse.contiguous()


class _SinkGradient(torch.autograd.Function):
    """The attention output as it is; backward, the sinks' gradient: out's derivative in a
    head's sink is -p_sink out, so d sink = -sum over rows of p_sink (dout . out)."""

    @staticmethod
    def forward(ctx, out, sinks, lse):
        ctx.save_for_backward(out, sinks, lse)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[1]:
            return grad_out, None, None
        out, sinks, lse = ctx.saved_tensors
        p_sink = torch.exp(sinks.float() - lse)  # (B, T, H)
        grad_sinks = -(p_sink * _row_dots(grad_out, out)).sum((0, 1)).to(sinks.dtype)
        return grad_out, grad_sinks, None


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a . b over the last dim in float32, (B, T, H, D) -> (B, T, H): a block of rows at a
    time, so no float32 copy of the whole (1.5 GiB a layer at V4-Flash's 4K tokens), and
    every product exact (bf16 products rounded to bf16 lose the sink's gradient where the
    rows' terms cancel)."""
    flat_a, flat_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    dots = torch.empty(flat_a.shape[0], dtype=torch.float32, device=a.device)
    step = max(1, DOT_FLOATS // a.shape[-1])
    for first in range(0, flat_a.shape[0], step):
        rows = slice(first, first + step)
        dots[rows] = (flat_a[rows].float() * flat_b[rows].float()).sum(-1)
    return dots.view(a.shape[:-1])
