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

CSA's picks where the reference gathers them (`picks_as_mask` false: past about 10K tokens at
V4-Flash's shape) go to `npu_sparse_flash_attention` instead (DeepSeek-V3.2's sparse
attention on Ascend): the tokens' key-value entries and the compressed entries are one key
sequence (T + E rows, one KV head), and each query lists its keys, the `window` tokens up to
itself in its document and its picks, valid ones first and -1 after (the docs' rule), so
the work is W + k keys a query, not 2W + E. The sink is not handed to the operator (its
`sinks` input is in the registered schema but not the docs, and whether its softmax_sum
counts the sink is written nowhere): with m = max(max, sink) the operator's softmax over the
listed keys is rescaled here by sum e^(max - m) / (sum e^(max - m) + e^(sink - m)), and the
backward operator gets m and that full sum with the rescaled output, so the probabilities it
recomputes are the ones with the sink.

Limits (the reference runs otherwise; the table says so): the sparse operator's README
(ops-transformer; the wheel's docs state none) asks bfloat16, query heads a power of two up to
128, one KV head and heads of 512 channels (V4's), and names it an inference operator of
Atlas A3, though the wheel registers its backward; other gathered picks run the reference.
Every query sees itself (positions >= 0, as the model's are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from birkhoff.kernels import v4_attention as reference
from birkhoff.kernels.npu_ops import NPU, _torch_npu
from birkhoff.kernels.registry import register

DOT_FLOATS = 1 << 24  # float32 values of a block of rows in the sinks' gradient (64 MiB)
# npu_sparse_flash_attention's constraints (its operator's README in ops-transformer: the
# wheel's docs give none): bf16 output, query heads a power of two to 128, one KV head, heads
# of 512 channels (V4's); for inference on Atlas A3 there, though the wheel registers a backward
SPARSE_DTYPES = (torch.bfloat16,)
SPARSE_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)
SPARSE_DIM = 512


def sparse_operator_takes(heads: int, dim: int, dtype: torch.dtype) -> bool:
    """Whether CSA's gathered picks of `heads` x `dim` in `dtype` go to the sparse operator
    (the planner asks it too)."""
    return dtype in SPARSE_DTYPES and heads in SPARSE_HEADS and dim == SPARSE_DIM


LIMITS = "CSA's gathered picks in bfloat16, 1 to 128 heads (a power of two) of 512 channels only"


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
    if batch * seq == 0:  # the operators: B, S >= 1
        return reference.v4_attention(q, kv, positions, sinks, window, entries)
    if entries is not None and not entries.as_mask(heads, dim):
        if not sparse_operator_takes(heads, dim, kv.dtype):
            return reference.v4_attention(q, kv, positions, sinks, window, entries)
        keys = torch.cat((kv, entries.values.to(kv.dtype)), dim=1)[:, :, None].contiguous()
        listed = sparse_key_indices(positions, window, entries.picks, entries.picked)
        query = q.to(kv.dtype).contiguous()
        return _SparseAttention.apply(query, keys, listed, sinks, dim**-0.5)
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
        return grad_out, _sink_gradient(grad_out, out, sinks, lse), None


def _sink_gradient(
    grad_out: torch.Tensor, out: torch.Tensor, sinks: torch.Tensor, lse: torch.Tensor
) -> torch.Tensor:
    """d sink = -sum over rows of p_sink (dout . out), p_sink = exp(sink - lse) (B, T, H)."""
    p_sink = torch.exp(sinks.float() - lse)
    return -(p_sink * _row_dots(grad_out, out)).sum((0, 1)).to(sinks.dtype)


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


def sparse_key_indices(
    positions: torch.Tensor, window: int, picks: torch.Tensor, picked: torch.Tensor
) -> torch.Tensor:
    """(B, T, 1, W + k) int32: the rows of [tokens; entries] each query attends to, its
    window (t, t - 1, ... while in its document and less than `window` behind) and its
    visible picks (T + entry), valid ones first in that order and -1 after."""
    batch, seq = positions.shape
    behind = torch.arange(window, device=positions.device, dtype=torch.int32)
    tokens = torch.arange(seq, device=positions.device, dtype=torch.int32)[:, None] - behind
    # (B, T, W): t - j in t's document (and in the sequence, should a position exceed t)
    in_window = (behind <= positions[:, :, None]) & (tokens >= 0)
    entries = (seq + picks).to(torch.int32)  # int32 throughout: (B, T, W + k) of them
    listed = torch.cat((tokens.expand(batch, -1, -1), entries), dim=-1)
    return valid_first(listed, torch.cat((in_window, picked), dim=-1))[:, :, None]


def valid_first(listed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each row's valid entries of `listed` first, in their order, and -1 after: the lists
    torch_npu's sparse operators read (their docs' rule)."""
    order = torch.sort((~valid).to(torch.uint8), dim=-1, stable=True).indices
    return listed.gather(-1, order).masked_fill_(~valid.gather(-1, order), -1)


class _SparseAttention(torch.autograd.Function):
    """npu_sparse_flash_attention over listed keys with V4's sink: forward the operator
    without the sink, its output rescaled by sum / (sum + e^(sink - max)); backward the
    backward operator given that output and the full sum (it recomputes the probabilities
    as e^(s - max) / sum and takes dout . out per row), the key gradient its key's and
    value's (they are one tensor), the sinks' -sum over rows of p_sink (dout . out).
    Returns the output (B, T, H, D) and the normaliser (B, T, H) float32 (not differentiable)."""

    @staticmethod
    def forward(ctx, query, keys, listed, sinks, scale):
        part, largest, sums = _torch_npu().npu_sparse_flash_attention(
            query,  # (B, T, H, D)
            keys,  # (B, T + E, 1, D): key and value
            keys,
            listed,
            scale,
            sparse_block_size=1,  # picks of single rows
            layout_query="BSND",
            layout_kv="BSND",
            sparse_mode=0,  # no causal mask of its own: the lists say what each query sees
            return_softmax_lse=True,
        )
        largest, sums = largest[:, 0], sums[:, 0]  # (B, T, H): one KV head
        # the sink joins the row's max (a sink far above the keys' would overflow e^(sink - max))
        sink = sinks.detach().float()
        top = torch.maximum(largest, sink)
        keys_sum = sums * torch.exp(largest - top)
        with_sink = keys_sum + torch.exp(sink - top)
        out = (part.float() * (keys_sum / with_sink)[..., None]).to(query.dtype)
        lse = top + with_sink.log()
        largest = top  # the backward's max, with the sum it goes with
        ctx.scale = scale
        ctx.save_for_backward(query, keys, listed, out, largest, with_sink, sinks, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        query, keys, listed, out, largest, with_sink, sinks, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_query, grad_key, grad_value, *_ = _torch_npu().npu_sparse_flash_attention_grad(
            query,
            keys,
            keys,
            listed,
            grad_out,
            out,
            largest[:, None].contiguous(),
            with_sink[:, None].contiguous(),
            ctx.scale,
            1,
            layout="BSND",
            sparse_mode=0,
        )
        grad_sinks = None
        if ctx.needs_input_grad[3]:
            grad_sinks = _sink_gradient(grad_out, out, sinks, lse)
        return grad_query, grad_key + grad_value, None, grad_sinks, None
