"""DeepSeek-V4's attention core (report §2.3) as a kernel op: each query's one softmax over the
`window` tokens up to itself (in its document), the compressed KV entries it may see and a
learned sink logit per head. The model computes the queries, the shared key-value entry of
every token and the compressed entries; this op attends.

`reference` (here): blocks of `window` queries against two blocks of keys, plain torch, never
T x T. CSA's picks are attended in whichever of two forms materialises less per query
(`picks_as_mask`): the picked entries gathered (k x D values, logits over k) or every entry
with the unpicked masked out (logits over E). The `triton` backend runs it as FlexAttention
(kernels/flex_v4_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from birkhoff.kernels.registry import REFERENCE, register

MASS_QUERIES = 1 << 22  # floats held at once while `entry_mass` sums attention (16 MiB)


def mass_queries_per_block(batch: int, heads: int, width: int, dim: int, picked: bool) -> int:
    """Queries `entry_mass` takes at once: as many as keep within MASS_QUERIES floats their
    logits and probabilities (heads x width each) and, at picks, the entries they gather
    (width x dim, shared by the heads)."""
    per_query = batch * width * (2 * heads + (dim if picked else 0))
    return max(1, MASS_QUERIES // max(1, per_query))


def picks_as_mask(heads: int, entries: int, picks: int, dim: int) -> bool:
    """Whether a query's `picks` of `entries` compressed entries are attended as a mask over
    all of them: its logits and probabilities over every entry (2 x heads x entries floats)
    against the gathered entries and the logits and probabilities at the picks (picks x dim
    + 2 x heads x picks). At `tiny` (6 heads, 32 entries, 16 picks of 64) the mask, 3x less;
    at V4-Flash's 4K-token training (64 heads, 1,024 entries, 512 picks of 512) the mask,
    2.5x less; at 64K tokens (16,384 entries) the gather, 6x less. Either gives the same
    softmax (an unpicked entry weighs exp(-inf) = 0); the mask needs no gather, whose
    backward accumulates rows one at a time."""
    return 2 * heads * entries <= picks * dim + 2 * heads * picks


def picked_mask(picks: torch.Tensor, picked: torch.Tensor, entries: int) -> torch.Tensor:
    """(B, T, entries) bool from picks (B, T, k): set where a query picked a visible entry
    (a query's picks are distinct, so no two write one place)."""
    mask = picked.new_zeros(*picks.shape[:-1], entries)
    return mask.scatter_(-1, picks, picked)


@dataclass
class BlockEntries:
    """Where each compressed entry comes from: (B, E) tensors, E = T // ratio slots per row
    (rows with fewer complete blocks have `exists` False in the remaining slots)."""

    start: torch.Tensor  # index of the block's first token in the window
    exists: torch.Tensor
    has_previous: torch.Tensor  # the block before it is in the same document (CSA overlap)
    position: torch.Tensor  # the first token's position in its document
    ratio: int

    def visible(self, positions: torch.Tensor, queries: slice = slice(None)) -> torch.Tensor:
        """(B, Q, E) bool: query t (of `queries`) sees entry e (complete by t, same document)."""
        t = torch.arange(positions.shape[1], device=positions.device)[queries]
        query_doc = (t - positions[:, queries])[:, :, None]
        entry_doc = (self.start - self.position)[:, None, :]
        complete = (self.start + self.ratio - 1)[:, None, :] <= t[None, :, None]
        return self.exists[:, None, :] & complete & (entry_doc == query_doc)


def gather_blocks(values: torch.Tensor, start: torch.Tensor, ratio: int) -> torch.Tensor:
    """(B, T, D) -> (B, E, ratio, D): the tokens of the blocks starting at `start` (B, E)."""
    batch, seq = values.shape[:2]
    index = (start[:, :, None] + torch.arange(ratio, device=start.device)).clamp(0, seq - 1)
    # rows of the flattened (B * T, D): index_select's backward is an index_add, where
    # values[rows, index]'s is an accumulating index_put that sorts the rows first
    index = index + seq * torch.arange(batch, device=values.device)[:, None, None]
    picked = values.flatten(0, 1).index_select(0, index.flatten())
    return picked.view(*index.shape, *values.shape[2:])


def fused_entries(
    kv: torch.Tensor,
    start: torch.Tensor,
    exists: torch.Tensor,
    has_previous: torch.Tensor,
    overlap: bool,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What a fused `kv_compress` takes besides kv, gate and bias: each entry's first token
    (int64, contiguous), its kind ((B, E) uint8: 0 no entry, 1 its block, 2 its block and a
    previous one, which the kernels read only where the blocks overlap: CSA) and the entries'
    width. The same ops for CSA and HCA: `birkhoff plan --launches` charges every call what
    the first one launched."""
    kinds = exists.to(torch.uint8) + (exists & has_previous).to(torch.uint8)
    dim = kv.shape[-1] // 2 if overlap else kv.shape[-1]
    return start.to(torch.int64).contiguous(), kinds, dim


@register("kv_compress", REFERENCE)
def kv_compress(
    kv: torch.Tensor,
    gate: torch.Tensor,
    position_bias: torch.Tensor,
    start: torch.Tensor,
    exists: torch.Tensor,
    has_previous: torch.Tensor,
    overlap: bool,
) -> torch.Tensor:
    """V4's compressed entries before their norm (report §2.3): from the projected states kv
    and gate (B, T, width) and the learned bias (ratio, width), each entry's channel is the
    softmax over its block's tokens of gate + bias, times their kv, summed; (B, E, dim), zero
    where no entry exists. The entries are `BlockEntries`' (B, E) tensors: each block's first
    token, whether it exists and whether the block before it is in the same document. HCA (not
    `overlap`): width = dim. CSA (`overlap`): width = 2 dim, the block's tokens give channels
    dim .. 2 dim and the previous block of the same document (if any) its tokens' channels
    0 .. dim, as V4's Ca/Cb series."""
    ratio = position_bias.shape[0]
    dim = kv.shape[-1] // 2 if overlap else kv.shape[-1]
    block_kv = gather_blocks(kv, start, ratio)
    logits = gather_blocks(gate, start, ratio).float() + position_bias.float()
    if overlap:
        previous = start - ratio
        prev_kv = gather_blocks(kv[..., :dim], previous, ratio)
        prev_logits = gather_blocks(gate[..., :dim], previous, ratio).float()
        prev_logits = prev_logits + position_bias[:, :dim].float()
        # The first block of a document has no previous block: its slots weigh nothing.
        prev_logits = prev_logits.masked_fill(~has_previous[:, :, None, None], -torch.inf)
        block_kv = torch.cat((prev_kv, block_kv[..., dim:]), dim=2)
        logits = torch.cat((prev_logits, logits[..., dim:]), dim=2)
    weights = torch.softmax(logits, dim=2).to(block_kv.dtype)
    # an entry that does not exist gathered its row's first tokens: 0 instead
    return (block_kv * weights).sum(dim=2) * exists[:, :, None]


@dataclass
class EntryKV:
    """The compressed entries a layer attends to besides its window: every visible one (HCA,
    CSA's dense warm-up) or, with `picks`, each query's own selection (CSA)."""

    values: torch.Tensor  # (B, E, D), key and value at once
    layout: BlockEntries
    picks: torch.Tensor | None = None  # (B, T, k) entry indices per query
    picked: torch.Tensor | None = None  # (B, T, k) whether each pick is a visible entry

    def as_mask(self, heads: int, dim: int) -> bool:
        """Whether queries of `heads` x `dim` attend to these entries as a mask over every
        entry (HCA's, or CSA's picks where picks_as_mask says so) rather than gathered."""
        if self.picks is None:
            return True
        return picks_as_mask(heads, self.values.shape[1], self.picks.shape[-1], dim)

    def seen(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, T, E) bool: the entries each query attends to (visible ones, or its picks)."""
        if self.picks is None:
            return self.layout.visible(positions)
        return picked_mask(self.picks, self.picked, self.values.shape[1])


@register("v4_attention", REFERENCE)
def v4_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    positions: torch.Tensor,
    sinks: torch.Tensor,
    window: int,
    entries: EntryKV | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (B, T, H, D), key-value entries (B, T, D) shared by the heads, positions in
    documents (B, T), sink logits (H,): the attention output (B, T, H, D, kv's dtype) and
    the log of each softmax's normaliser, sink included (B, T, H, float32; detached: it
    serves the CSA indexer's target, which learns nothing back)."""
    batch, seq, _, dim = q.shape
    scale = dim**-0.5
    window_logits, keys = _window_logits(q, kv, positions, window, scale)
    entry_logits, entry_values = _entry_logits(q, positions, entries, scale)
    sink = sinks.float().view(1, 1, -1, 1).expand(batch, seq, -1, 1)
    logits = torch.cat((window_logits, entry_logits, sink), dim=-1)
    probs = torch.softmax(logits, dim=-1)
    # The normaliser read off the softmax: at a row's largest logit p = exp(top - lse), and
    # that p is at least 1 / width, so lse = top - log(p) keeps float32's precision (logsumexp
    # ran a second exp pass over the logits: 2% of a `tiny` step on a CPU).
    lse = logits.detach().amax(-1) - probs.detach().amax(-1).log()
    width = window_logits.shape[-1]
    out = _window_sum(probs[..., :width].to(kv.dtype), keys, seq, window)
    if entry_values is not None:
        p_entries = probs[..., width:-1].to(kv.dtype)
        pattern = "bthe,bed->bthd" if entry_values.dim() == 3 else "bthk,btkd->bthd"
        out = out + torch.einsum(pattern, p_entries, entry_values)
    return out, lse


@register("entry_mass", REFERENCE)
@torch.no_grad()
def entry_mass(
    q: torch.Tensor,
    values: torch.Tensor,
    picks: torch.Tensor,
    picked: torch.Tensor,
    lse: torch.Tensor,
) -> torch.Tensor:
    """The CSA indexer's target: the attention probability at each query's picks summed over
    its heads, (B, T, k) float32, 0 where a pick is not visible. Queries (B, T, H, D), entries
    (B, E, D), picks (B, T, k) indices into them, picked (B, T, k) bool, `lse` the attention's
    normaliser (B, T, H). A block of queries at a time (mass_queries_per_block), so memory
    stays within MASS_QUERIES floats; no gradient."""
    batch, seq, heads, dim = q.shape
    width, count = picks.shape[-1], values.shape[1]
    mass = q.new_zeros(batch, seq, width, dtype=torch.float32)
    as_mask = picks_as_mask(heads, count, width, dim)  # as the attention took them
    block = mass_queries_per_block(batch, heads, count if as_mask else width, dim, not as_mask)
    rows = torch.arange(batch, device=q.device)[:, None, None]
    for first in range(0, seq, block):
        part = slice(first, min(seq, first + block))
        if as_mask:  # the mass at every entry, then at the picks
            logits = torch.einsum("bthd,bed->bthe", q[:, part].float(), values.float())
            every = _summed_over_heads(logits, lse[:, part], None, dim**-0.5)
            at_picks = every.gather(-1, picks[:, part])
            mass[:, part] = at_picks.masked_fill_(~picked[:, part], 0.0)
            continue
        chosen = values[rows, picks[:, part]].float()
        logits = torch.einsum("bthd,btkd->bthk", q[:, part].float(), chosen)
        mass[:, part] = _summed_over_heads(logits, lse[:, part], picked[:, part], dim**-0.5)
    return mass


@torch.no_grad()
def dense_entry_mass(
    q: torch.Tensor, positions: torch.Tensor, entries: EntryKV, lse: torch.Tensor
) -> torch.Tensor:
    """`entry_mass` over every entry (B, T, E), 0 where not visible: the indexer's target
    in its dense warm-up (train.indexer_warmup_steps), whose memory grows as T x E anyway."""
    batch, seq, heads, dim = q.shape
    width = entries.values.shape[1]
    mass = q.new_zeros(batch, seq, width, dtype=torch.float32)
    block = mass_queries_per_block(batch, heads, width, dim, picked=False)
    for first in range(0, seq, block):
        part = slice(first, min(seq, first + block))
        logits = torch.einsum("bthd,bed->bthe", q[:, part].float(), entries.values.float())
        visible = entries.layout.visible(positions, part)
        mass[:, part] = _summed_over_heads(logits, lse[:, part], visible, dim**-0.5)
    return mass


def _summed_over_heads(
    logits: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """exp(scale logits - lse) summed over heads, 0 where not `valid` (if given): (B, Q, H,
    W) logits, (B, Q, H) normalisers, (B, Q, W) -> (B, Q, W)."""
    mass = torch.exp(logits * scale - lse[..., None]).sum(-2)
    return mass if valid is None else mass.masked_fill(~valid, 0.0)


def _window_logits(
    q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, window: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, H, 2W) of each query against the two key blocks around it (-inf
    outside its window and its document) and those keys (B, T/W blocks, 2W, D)."""
    seq = positions.shape[1]
    q_blocks = query_blocks(q, window)
    keys = window_keys(kv, window)
    logits = torch.einsum("bnqhd,bnkd->bnqhk", q_blocks.float(), keys.float()) * scale
    allowed = window_allowed(positions, window)
    logits = logits.masked_fill(~allowed[:, :, :, None, :], -torch.inf)
    return logits.flatten(1, 2)[:, :seq], keys


def query_blocks(q: torch.Tensor, window: int) -> torch.Tensor:
    """(B, T, H, D) -> (B, nb, W, H, D): the queries in blocks of `window`, zeros past T."""
    batch, seq = q.shape[:2]
    blocks = -(-seq // window)
    padded = F.pad(q, (0, 0, 0, 0, 0, blocks * window - seq))
    return padded.view(batch, blocks, window, *q.shape[2:])


def window_keys(kv: torch.Tensor, window: int) -> torch.Tensor:
    """(B, T, D) -> (B, nb, 2W, D): for each block of queries the keys of the block before
    it and its own (zeros before the first token and past T)."""
    batch, seq = kv.shape[:2]
    blocks = -(-seq // window)
    kv_padded = F.pad(kv, (0, 0, window, blocks * window - seq))
    kv_padded = kv_padded.view(batch, blocks + 1, window, -1)
    return torch.cat((kv_padded[:, :-1], kv_padded[:, 1:]), dim=2)


def window_allowed(positions: torch.Tensor, window: int) -> torch.Tensor:
    """(B, nb, W, 2W) bool: whether each query of a block sees each of its window_keys (in
    its window and its document)."""
    batch, seq = positions.shape
    blocks = -(-seq // window)
    padded = blocks * window
    query = torch.arange(padded, device=positions.device).view(blocks, window, 1)
    key = (torch.arange(blocks, device=positions.device) * window - window).view(blocks, 1, 1)
    key = key + torch.arange(2 * window, device=positions.device)
    behind = query - key  # (nb, W, 2W): how far each key lies behind the query
    in_document = F.pad(positions, (0, padded - seq)).view(batch, blocks, window, 1)
    return (behind >= 0) & (behind < window) & (behind <= in_document)


def _window_sum(p: torch.Tensor, keys: torch.Tensor, seq: int, window: int) -> torch.Tensor:
    batch, blocks = keys.shape[:2]
    p = F.pad(p, (0, 0, 0, 0, 0, blocks * window - seq)).view(batch, blocks, -1, *p.shape[2:])
    out = torch.einsum("bnqhk,bnkd->bnqhd", p, keys)
    return out.flatten(1, 2)[:, :seq]


def _entry_logits(
    q: torch.Tensor, positions: torch.Tensor, entries: EntryKV | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (B, T, H, K) against the entries each query may attend to (-inf where not
    visible) and their values: (B, E, D) shared by all queries, or (B, T, k, D) picked."""
    batch, seq, heads, dim = q.shape
    if entries is None:
        return q.new_zeros(batch, seq, heads, 0, dtype=torch.float32), None
    if entries.as_mask(heads, dim):
        seen = entries.seen(positions)
        logits = torch.einsum("bthd,bed->bthe", q.float(), entries.values.float()) * scale
        return logits.masked_fill(~seen[:, :, None, :], -torch.inf), entries.values
    rows = torch.arange(batch, device=q.device)[:, None, None]
    # Gathered from float32: the gather's backward adds every picking query's gradient into
    # its entry, which in bf16 rounds each of thousands of additions (relative error 0.2 at
    # 1024 tokens, 2.4 at 4096 with 64 heads, against 4e-3 in float32).
    wide = torch.promote_types(entries.values.dtype, torch.float32)
    chosen = entries.values.to(wide)[rows, entries.picks]  # (B, T, k, D)
    logits = torch.einsum("bthd,btkd->bthk", q.float(), chosen.float()) * scale
    hidden = ~entries.picked[:, :, None, :]
    return logits.masked_fill(hidden, -torch.inf), chosen.to(entries.values.dtype)
