"""DeepSeek-V4's attention core (kernels/v4_attention.py) on FlexAttention: the `triton`
backend's implementation. On CUDA it runs compiled (torch's fused Triton templates, forward
and backward); nothing T x T is formed: a block mask lists, per block of 128 queries, the key
blocks it may use, and a mask function decides each query-key pair inside them.

Two calls where the layer has compressed entries, their results merged by their
log-sum-exps: the window (the layer's one KV head shared by every query head, as GQA), and the
entries, given as one KV head per query head (a broadcast view). FlexAttention's backward
gives each KV head's key blocks to one program, which walks every query head sharing it and
every query block using the block: a window block is used by two query blocks, but an HCA
entry by every later query, so in one joint call a single program walked all heads times all
query blocks (at 4,096 tokens and 64 heads, 64 x 256 tiles of 16 queries) while the others
had done; that serial program is this file's reading of the H200's HCA and CSA rows (0.08x
the reference, the sliding layer 0.52x). With a head each, the entries' blocks are spread
over a program per head. The cost: the backward's key and value gradients of the entries
are made per head, (B, H, E, D) each, then summed (a transient half the size of the queries'
gradient in a CSA layer of ratio 4; unmeasured on a GPU, as the speed). HCA and CSA's dense
warm-up read an entry's visibility from its layout (complete before the query, same
document); CSA reads each query's picks from a (B, T, ceil(E / 8)) bit set (E = T / ratio)
where the picks are taken as a mask (`picks_as_mask`); where the reference gathers them
(long sequences) the entries' part is a Triton kernel reading each query's own picks
(kernels/triton_gathered_attention.py): FlexAttention's blocks of 128 entries would compute
nearly every entry at 64K tokens. Its backward adds into the entries' gradient atomically
(an order that varies): under train.deterministic (torch's deterministic algorithms) the
entries keep FlexAttention's call.

Sinks: FlexAttention has no logit without a key, so a sink enters through the normaliser.
With L_w and L_e the log-sum-exps over the window's keys and the entries and s the sink, L =
log(exp(L_w) + exp(L_e) + exp(s)) and the output is out_w exp(L_w - L) + out_e exp(L_e - L)
(kernels/lse_merge.py, which keeps no float32 copy of the parts); FlexAttention's L is
differentiable, so the sink, keys and entries get their gradients as in one softmax (a query
that sees no entry has L_e = -inf and out_e = 0).

On a CPU (the tests' interpreted mode of this backend) torch runs FlexAttention unfused
(it materialises the scores) and refuses the backward; the CPU trains with the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from birkhoff.kernels.lse_merge import merge_softmax_parts
from birkhoff.kernels.registry import register
from birkhoff.kernels.triton_gathered_attention import gathered_entry_attention
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
    query = q.to(kv.dtype).transpose(1, 2)  # (B, H, T, D)
    values = None if entries is None else entries.values.to(kv.dtype)
    keys = kv
    if values is not None and not values.shape[1]:  # no complete block yet: the entries
        keys = torch.cat((kv, values), dim=1)  # stay in the graph (zero gradients, as the
        values = None  # reference gives them), the window alone attended
    parts = [_attend(query, keys[:, None], _window_block_mask(positions, window))]
    gathered = values is not None and not entries.as_mask(q.shape[2], q.shape[3])
    # its backward adds into the entries atomically: not with deterministic algorithms
    if gathered and not torch.are_deterministic_algorithms_enabled():
        # CSA's picks where the reference gathers them: each query's own rows, in Triton
        parts.append(gathered_entry_attention(q, values, entries.picks, entries.picked))
    elif values is not None:
        values = values[:, None].expand(-1, q.shape[2], -1, -1)  # a KV head per query head
        parts.append(_attend(query, values, _entry_block_mask(positions, entries)))
    outs, lses = zip(*parts, strict=True)
    return merge_softmax_parts(list(outs), list(lses), sinks)


def _attend(
    query: torch.Tensor, keys: torch.Tensor, block_mask: BlockMask
) -> tuple[torch.Tensor, torch.Tensor]:
    """query (B, H, T, D), keys = values (B, H or 1, K, D) -> out (B, T, H, D) in the keys'
    dtype, log-sum-exp (B, T, H) float32 over the keys (-inf where none is allowed)."""
    dim = query.shape[-1]
    attend = _fused_flex() if query.is_cuda else flex_attention
    out, aux = attend(
        query,
        keys,
        keys,
        block_mask=block_mask,
        scale=dim**-0.5,
        enable_gqa=keys.shape[1] != query.shape[1],
        return_aux=AuxRequest(lse=True),
        kernel_options=WIDE_HEAD_TILES if query.is_cuda and dim > WIDE_HEAD else None,
    )
    return out.transpose(1, 2), aux.lse.transpose(1, 2).float()


def _blocks(dense: torch.Tensor, mask_mod: Callable, seq: int, keys: int) -> BlockMask:
    """A BlockMask from (B, query blocks, key blocks) bool: the used key blocks of each query
    block listed first."""
    dense = dense[:, None]  # (B, 1, query blocks, key blocks): the same for every head
    counts = dense.sum(-1, dtype=torch.int32)
    order = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(
        counts, order, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(seq, keys)
    )


def _window_block_mask(positions: torch.Tensor, window: int) -> BlockMask:
    """The keys 0 <= q - k < window of the query's own document."""
    batch, seq = positions.shape
    blocks = torch.arange(-(-seq // BLOCK), device=positions.device)
    qb, kb = blocks[:, None], blocks[None, :]
    # key block kb holds a key 0 <= q - k < window for some query of block qb
    in_window = (kb <= qb) & ((kb + 1) * BLOCK - 1 > qb * BLOCK - window)

    def mask(b, h, q_idx, kv_idx):
        query = q_idx.clamp(max=seq - 1)  # the kernels may ask past the end: read in bounds
        behind = q_idx - kv_idx
        own = (kv_idx < seq) & (behind >= 0) & (behind < window)
        return own & (behind <= positions[b, query])

    return _blocks(in_window.expand(batch, -1, -1), mask, seq, seq)


def _entry_block_mask(positions: torch.Tensor, entries: EntryKV) -> BlockMask:
    """The compressed entries a query sees: complete before it in its document (HCA, CSA's
    dense warm-up), or the ones it picked (CSA)."""
    batch, seq = positions.shape
    count = entries.values.shape[1]
    device = positions.device
    q_blocks, e_blocks = -(-seq // BLOCK), -(-count // BLOCK)
    if entries.picks is None:
        # The e-th entry starts at token >= e * ratio (blocks are disjoint and in order),
        # so a block of queries can see only entries below (last query + 1) / ratio.
        qb = torch.arange(q_blocks, device=device)[:, None]
        eb = torch.arange(e_blocks, device=device)[None, :]
        used = (eb * BLOCK < (qb + 1) * BLOCK // entries.layout.ratio).expand(batch, -1, -1)
        picked = None
    else:
        used = _picked_blocks(entries, q_blocks, e_blocks)
        picked = _picked_entries(entries, seq)
    layout = entries.layout

    def mask(b, h, q_idx, kv_idx):
        query = q_idx.clamp(max=seq - 1)  # in bounds, as the window's
        e = kv_idx.clamp(max=count - 1)
        if picked is not None:
            seen = ((picked[b, query, e // 8] >> (e % 8)) & 1).bool()
        else:
            start = layout.start[b, e]
            seen = layout.exists[b, e] & (start + layout.ratio - 1 <= q_idx)
            seen = seen & (start - layout.position[b, e] == query - positions[b, query])
        return (kv_idx < count) & seen

    return _blocks(used, mask, seq, count)


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
