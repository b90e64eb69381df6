"""DeepSeek-V4's attention core (kernels/v4_attention.py) on FlexAttention: the `triton`
backend's implementation. On CUDA it runs compiled (torch's fused Triton templates, forward
and backward); nothing T x T is formed: the block mask lists, per block of 128 queries, the
key blocks of its window and the entry blocks it may use, and the mask function decides each
query-key pair inside them.

One key sequence: the window's tokens (padded to whole blocks), then the compressed entries.
HCA and CSA's dense warm-up read an entry's visibility from its layout (complete before the
query, same document); CSA reads each query's picks from a (B, T, E) boolean (E = T / ratio).

Sinks: FlexAttention has no logit without a key, so a sink enters through the normaliser.
With L the log-sum-exp over the keys and s the sink, the output is out * exp(L) / (exp(L) +
exp(s)) = out * sigmoid(L - s) and the normaliser logaddexp(L, s); FlexAttention's L is
differentiable, so the sink and the keys get their gradients as in one softmax.

On a CPU (the tests' interpreted mode of this backend) torch runs FlexAttention unfused
(it materialises the scores) and refuses the backward; the CPU trains with the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from birkhoff.kernels.registry import register
from birkhoff.kernels.v4_attention import EntryKV

BLOCK = 128  # FlexAttention's default block of queries and of keys
# Inductor's default tiles for a 512-wide head (V4's) ask 256 KiB of shared memory for the
# forward (queries 128 x 512 and keys and values 64 x 512 in bf16; an H200 has 227 KiB): wide
# heads take smaller tiles, a single stage, and backward tiles to match (each divides BLOCK).
WIDE_HEAD = 256
WIDE_HEAD_TILES = {
    "BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 1,
    "BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16,
}  # fmt: skip


@functools.cache
def _fused_flex() -> Callable:
    """FlexAttention compiled (at its first call). Made on first use: torch.compile imports
    dynamo and inductor (~200 MB resident), which a run without this op should not pay."""
    return torch.compile(flex_attention, dynamic=False)


@register("v4_attention", "triton")
def v4_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    positions: torch.Tensor,
    sinks: torch.Tensor,
    window: int,
    entries: EntryKV | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as the reference `v4_attention`."""
    seq, dim = q.shape[1], q.shape[-1]
    entries_from = -(-seq // BLOCK) * BLOCK  # the first entry's key index
    keys = F.pad(kv, (0, 0, 0, entries_from - seq))
    if entries is not None:
        keys = torch.cat((keys, entries.values.to(kv.dtype)), dim=1)  # in the graph if empty
        if not entries.values.shape[1]:  # no complete block yet: the window alone (the mask
            entries = None  # function would index the empty entries)
    block_mask = _block_mask(positions, window, entries, entries_from, keys.shape[1])
    attend = _fused_flex() if q.is_cuda else flex_attention
    tiles = WIDE_HEAD_TILES if q.is_cuda and dim > WIDE_HEAD else None
    out, aux = attend(
        q.to(kv.dtype).transpose(1, 2),
        keys[:, None],
        keys[:, None],
        block_mask=block_mask,
        scale=dim**-0.5,
        enable_gqa=True,
        return_aux=AuxRequest(lse=True),
        kernel_options=tiles,
    )
    lse = aux.lse.transpose(1, 2).float()  # (B, T, H), over the keys only
    sink = sinks.float().expand_as(lse)
    out = out.transpose(1, 2).float() * torch.sigmoid(lse - sink)[..., None]
    return out.to(kv.dtype), torch.logaddexp(lse, sink).detach()


def _block_mask(
    positions: torch.Tensor,
    window: int,
    entries: EntryKV | None,
    entries_from: int,
    keys: int,
) -> BlockMask:
    batch, seq = positions.shape
    device = positions.device
    q_blocks = -(-seq // BLOCK)
    qb = torch.arange(q_blocks, device=device)[:, None]
    kb = torch.arange(q_blocks, device=device)[None, :]
    # key block kb holds a key 0 <= q - k < window for some query of block qb
    in_window = (kb <= qb) & ((kb + 1) * BLOCK - 1 > qb * BLOCK - window)
    used = [in_window.expand(batch, -1, -1)]
    picked = None
    if entries is not None:
        e_blocks = -(-entries.values.shape[1] // BLOCK)
        if entries.picks is None:
            # The e-th entry starts at token >= e * ratio (blocks are disjoint and in order),
            # so a block of queries can see only entries below (last query + 1) / ratio.
            eb = torch.arange(e_blocks, device=device)[None, :]
            last = (qb + 1) * BLOCK // entries.layout.ratio
            used.append((eb * BLOCK < last).expand(batch, -1, -1))
        else:
            picked = _picked_entries(entries, seq)
            used.append(_picked_blocks(entries, q_blocks, e_blocks))
    dense = torch.cat(used, dim=-1)[:, None]  # (B, 1, query blocks, key blocks)
    counts = dense.sum(-1, dtype=torch.int32)
    order = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    mask = _mask_mod(positions, window, entries, entries_from, picked)
    return BlockMask.from_kv_blocks(
        counts, order, BLOCK_SIZE=BLOCK, mask_mod=mask, seq_lengths=(seq, keys)
    )


def _picked_entries(entries: EntryKV, seq: int) -> torch.Tensor:
    """(B, T, ceil(E / 8)) uint8, a bit per entry: bit e % 8 of byte e // 8 is set where query
    t picked entry e (and it is visible). A bool per entry would be 8x larger: T^2 / (8 ratio)
    bytes per sequence, 1 GiB at 64K tokens and V4's CSA ratio 4."""
    batch, count = entries.values.shape[:2]
    packed = torch.zeros(batch, seq, -(-count // 8), dtype=torch.uint8, device=entries.picks.device)
    bits = entries.picked.to(torch.uint8) << (entries.picks % 8).to(torch.uint8)
    # a query's picks are distinct entries, so adding their bits within a byte sets them
    return packed.scatter_add_(-1, entries.picks // 8, bits)


def _picked_blocks(entries: EntryKV, q_blocks: int, e_blocks: int) -> torch.Tensor:
    """(B, query blocks, entry blocks) bool: some query of the block picked an entry in it."""
    batch, seq, _ = entries.picks.shape
    query_block = (torch.arange(seq, device=entries.picks.device) // BLOCK)[None, :, None]
    cell = query_block * e_blocks + entries.picks // BLOCK
    hits = torch.zeros(batch, q_blocks * e_blocks, dtype=torch.int32, device=cell.device)
    hits.scatter_add_(1, cell.reshape(batch, -1), entries.picked.reshape(batch, -1).int())
    return (hits > 0).view(batch, q_blocks, e_blocks)


def _mask_mod(
    positions: torch.Tensor,
    window: int,
    entries: EntryKV | None,
    entries_from: int,
    picked: torch.Tensor | None,
) -> Callable:
    seq = positions.shape[1]
    count = 0 if entries is None else entries.values.shape[1]

    def mask(b, h, q_idx, kv_idx):
        query = q_idx.clamp(max=seq - 1)  # the kernels may ask past the end: read in bounds
        behind = q_idx - kv_idx
        own = (kv_idx < seq) & (behind >= 0) & (behind < window)
        own = own & (behind <= positions[b, query])
        if entries is None:
            return own
        e = (kv_idx - entries_from).clamp(0, count - 1)
        if picked is not None:
            seen = ((picked[b, query, e // 8] >> (e % 8)) & 1).bool()
        else:
            layout = entries.layout
            start = layout.start[b, e]
            seen = layout.exists[b, e] & (start + layout.ratio - 1 <= q_idx)
            seen = seen & (start - layout.position[b, e] == query - positions[b, query])
        return own | ((kv_idx >= entries_from) & seen)

    return mask
