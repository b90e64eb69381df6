"""The inputs `birkhoff doctor` checks each op with (launch/doctor_kernels.py), float32 on the
CPU (moved to the device there): each op at a shape of the models it serves, and the further
calls that reach the op's other paths (V4's query norm, sigmoid scores, compressed entries)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from birkhoff.kernels.reference import group_ends
from birkhoff.kernels.v4_attention import BlockEntries, EntryKV
from birkhoff.model.compression import block_entries


def _mhc_pre(tokens: int) -> list:
    return [torch.randn(tokens, 4, 512), torch.rand(tokens, 4)]


def _mhc_post(tokens: int) -> list:
    streams, layer_out = torch.randn(tokens, 4, 512), torch.randn(tokens, 512)
    return [streams, layer_out, torch.rand(tokens, 4, 4), 2 * torch.rand(tokens, 4)]


def _mhc_mapping(tokens: int) -> list:
    n, hidden = 4, 512  # V4 tiny's shape, V4's form: 24 values per token, 20 iterations
    weight = torch.randn(2 * n + n * n, n * hidden) / (n * hidden) ** 0.5
    biases = [torch.randn(n), torch.randn(n), 4 * torch.eye(n)]
    return [torch.randn(tokens, n, hidden), weight, torch.rand(3), *biases, 1e-6, 20, 1e-6]


def _mhc_merge_read(tokens: int) -> list:
    merge = _mhc_post(tokens)  # H_res's rows near a distribution, as Sinkhorn's are
    merge[2] = torch.softmax(merge[2], -1)
    return [*merge, *_mhc_mapping(tokens)[1:]]  # the next read's arguments after the streams


def _rms_norm(tokens: int) -> list:
    return [torch.randn(tokens, 1024), torch.rand(1024) + 0.5, 1e-6]


def _rope(tokens: int) -> list:
    angles = torch.rand(tokens, 32) * 6  # (T, D/2); queries (B, T, H, D), grouped keys
    return [
        torch.randn(1, tokens, 8, 64),
        torch.randn(1, tokens, 2, 64),
        angles.cos(),
        angles.sin(),
    ]


def _rope_trailing(tokens: int) -> list:
    angles = torch.rand(1, tokens, 1, 32) * 6  # a token's angles for all its heads' last 64
    return [torch.randn(1, tokens, 8, 128), angles.cos(), angles.sin()]


def _kv_compress(tokens: int) -> list:
    split = tokens // 3  # two documents: blocks restart at the second, which has no previous
    positions = torch.cat((torch.arange(split), torch.arange(tokens - split)))[None]
    kv, gate = torch.randn(1, tokens, 256), 2 * torch.randn(1, tokens, 256)  # CSA's 2 x 128
    entries = block_entries(positions, 4)
    layout = [entries.start, entries.exists, entries.has_previous]
    return [kv, gate, torch.randn(4, 256), *layout, True]


def _attention(tokens: int) -> list:
    heads, kv_heads = 8, 2  # (B, H, T, D), grouped key/value heads
    return [torch.randn(1, heads, tokens, 64), *(torch.randn(1, kv_heads, tokens, 64),) * 2]


def _grouped_gemm(tokens: int) -> list:
    experts = 8
    counts = torch.full((experts,), tokens // experts)
    counts[-1] += tokens - counts.sum()  # every row in a group
    return [torch.randn(tokens, 256), torch.randn(experts, 256, 128) / 16, group_ends(counts)]


def _swiglu(tokens: int) -> list:
    return [4 * torch.randn(tokens, 1024), 4 * torch.randn(tokens, 1024), 10.0]  # V4's clamp


def _sinkhorn_knopp(tokens: int) -> list:
    return [2 * torch.randn(tokens, 4, 4), 20]  # mHC's H_res logits, 20 iterations


def _sinkhorn_knopp_eps(tokens: int) -> list:
    return [2 * torch.randn(tokens, 4, 4), 20, 1e-6]  # V4's form, its hc_eps


def _v4_attention(tokens: int) -> list:
    heads, dim = 8, 64  # a sliding-window layer; two documents packed in the window
    split = tokens // 3
    positions = torch.cat((torch.arange(split), torch.arange(tokens - split)))[None]
    q, kv = torch.randn(1, tokens, heads, dim), torch.randn(1, tokens, dim)
    return [q, kv, positions, torch.randn(heads), min(128, tokens // 2)]


def _entry_mass(tokens: int) -> list:
    heads, dim, entries, picks = 8, 64, max(2, tokens // 4), 32  # a CSA layer's target
    index = torch.rand(1, tokens, entries).topk(min(picks, entries), dim=-1).indices
    return [
        torch.randn(1, tokens, heads, dim),
        torch.randn(1, entries, dim),
        index,
        torch.rand(index.shape) > 0.2,  # picks a query cannot see are not picked
        torch.randn(1, tokens, heads) + 3,
    ]


def _indexer_loss(tokens: int) -> list:
    """A CSA layer's indexer loss at V4's widths (the npu operator's: 8 heads of 512, 8
    indexer heads of 128) against the entries of two documents' blocks of 4 tokens, up to 16
    random visible picks a query; the normaliser above the logits, as the attention's is."""
    split = tokens // 3
    positions = torch.cat((torch.arange(split), torch.arange(tokens - split)))[None]
    layout = block_entries(positions, 4)
    entries = layout.start.shape[1]
    q, values = torch.randn(1, tokens, 8, 512), torch.randn(1, entries, 512)
    lse = torch.einsum("bthd,bed->bthe", q, values).mul(512**-0.5).logsumexp(-1)
    picks = _picked(values, layout, positions, 16)
    index_q, index_keys = torch.randn(1, tokens, 8, 128), torch.randn(1, entries, 128)
    weights = torch.randn(1, tokens, 8)
    return [q, values, lse, index_q, index_keys, weights, picks.picks, picks.picked]


def _expert_ids(tokens: int, experts: int = 8, top_k: int = 4) -> torch.Tensor:
    return torch.rand(tokens, experts).topk(top_k, dim=-1).indices  # k distinct per token


def _moe_permute(tokens: int) -> list:
    return [torch.randn(tokens, 1024), _expert_ids(tokens), 8]


def _moe_route(tokens: int) -> list:
    """V4's router: 256 experts, top 8, sqrt(softplus) scores; each token's logits spread
    apart so that float32 and float64 pick the same experts."""
    spread = torch.argsort(torch.rand(tokens, 256), -1).float() / 256 * 8 - 4
    return [spread + 0.01 * torch.randn(tokens, 256), 0.01 * torch.randn(256), 8,
            "sqrt_softplus", 2.5]  # fmt: skip


def _moe_unpermute(tokens: int) -> list:
    order = _expert_ids(tokens).flatten().argsort(stable=True)  # as moe_permute gives it
    return [torch.randn(tokens * 4, 1024), order, torch.rand(tokens, 4), tokens]


def _engram_gather_gate(tokens: int) -> list:
    heads, dim, streams, hidden, rows = 8, 32, 4, 512, 4096  # tiny's shape, a 4096-row table
    return [
        torch.randn(rows, dim),
        torch.randint(0, rows, (1, tokens, heads)),
        torch.randn(streams * hidden, heads * dim) / 16,
        torch.randn(hidden, heads * dim) / 16,
        torch.randn(1, tokens, streams, hidden),
        1e-6,
    ]


def _engram_merge(tokens: int) -> list:
    *gate, eps = _engram_gather_gate(tokens)
    hidden, lags = gate[3].shape[0], 4  # tiny's convolution: 4 lags, 3 tokens apart
    return [*gate, torch.rand(hidden) + 0.5, torch.randn(lags, hidden) / 2, 3, eps]


def _linear_cross_entropy(tokens: int) -> list:
    hidden, vocab = 512, 4096  # tiny's vocabulary; the loss's gradient is 1/tokens per token
    targets = torch.randint(0, vocab, (tokens,))
    return [torch.randn(tokens, hidden), torch.randn(vocab, hidden) / 16, targets]


# Inputs of each op a backend accelerates (float32; tensors moved to the device; floating
# tensors are differentiated, other arguments passed as they are).
EXAMPLES: dict[str, Callable[[int], list]] = {
    "mhc_pre": _mhc_pre,
    "mhc_post": _mhc_post,
    "mhc_mapping": _mhc_mapping,
    "mhc_read": _mhc_mapping,  # the mapping's arguments; out: H_pre x, H_post, H_res, x
    "mhc_merge_read": _mhc_merge_read,  # a merge's, then the read's; out: mhc_read's
    "rms_norm": _rms_norm,
    "rope": _rope,
    "rope_trailing": _rope_trailing,
    "kv_compress": _kv_compress,
    "attention": _attention,
    "grouped_gemm": _grouped_gemm,
    "swiglu": _swiglu,
    "sinkhorn_knopp": _sinkhorn_knopp,
    "sinkhorn_knopp_eps": _sinkhorn_knopp_eps,
    "v4_attention": _v4_attention,
    "entry_mass": _entry_mass,
    "indexer_loss": _indexer_loss,
    "moe_permute": _moe_permute,
    "moe_route": _moe_route,
    "moe_unpermute": _moe_unpermute,
    "engram_gather_gate": _engram_gather_gate,
    "engram_merge": _engram_merge,
    "linear_cross_entropy": _linear_cross_entropy,
}
# Floating inputs that are no op's to differentiate (by position): the model's buffers.
# the rotation tables; the router's bias (balancing's, steering the choice only)
# the attention's queries, entries and normaliser (the indexer learns from them, not back)
CONSTANT_ARGS = {
    "rope": (2, 3),
    "rope_trailing": (1, 2),
    "moe_route": (1,),
    "indexer_loss": (0, 1, 2),
}


def _with_query_norm(args: list) -> list:
    """rope_trailing with V4's query norm (inverse False, norm_eps)."""
    return [*args, False, 1e-6]


def _with_sigmoid_scores(args: list) -> list:
    """moe_route with V3's sigmoid scores (npu's gating operator takes no other)."""
    logits, bias, top_k, _, scale = args
    return [logits, bias, top_k, "sigmoid", scale]


def _with_chosen_experts(args: list) -> list:
    """moe_route (sigmoid) with the experts chosen outside it: a hash layer's."""
    logits = args[0]
    chosen = torch.rand(logits.shape, device=logits.device).topk(args[2], dim=-1).indices
    return [*_with_sigmoid_scores(args), chosen]


def _with_groups(args: list) -> list:
    """moe_route as DeepSeek-V3 routes: sigmoid scores, the 256 experts in 8 groups, the 4
    best groups kept."""
    return [*_with_sigmoid_scores(args), None, 8, 4]


def _with_hca_entries(args: list) -> list:
    """v4_attention with an HCA layer's entries: every complete block of 8 tokens."""
    kv, positions = args[1:3]
    layout = block_entries(positions, 8)
    values = torch.randn(*layout.start.shape, kv.shape[-1], device=kv.device, dtype=kv.dtype)
    return [*args, EntryKV(values, layout)]


def _with_csa_picks(args: list) -> list:
    """v4_attention with a CSA layer's picks (blocks of 4 tokens; a quarter of the entries
    picked, so that every backend attends them as a mask over the entries)."""
    kv, positions = args[1:3]
    layout = block_entries(positions, 4)
    values = torch.randn(*layout.start.shape, kv.shape[-1], device=kv.device, dtype=kv.dtype)
    return [*args, _picked(values, layout, positions, max(1, values.shape[1] // 4))]


def _picked(
    values: torch.Tensor,
    layout: BlockEntries,
    positions: torch.Tensor,
    count: int,
    generator: torch.Generator | None = None,
) -> EntryKV:
    """CSA's entries with `count` random visible picks a query (fewer where fewer exist)."""
    scores = torch.rand(
        *positions.shape, values.shape[1], device=values.device, generator=generator
    )
    scores = scores.masked_fill(~layout.visible(positions), -torch.inf)
    top = scores.topk(min(count, values.shape[1]), dim=-1)
    return EntryKV(values, layout, top.indices, torch.isfinite(top.values))


def _with_gathered_csa_picks(args: list) -> list:
    """v4_attention as V4 runs it at long context: bfloat16, heads of 512 channels (the npu
    sparse operator's only width) and a CSA layer's picks gathered (picks_as_mask), 3 of
    them: few enough of the entries (blocks of 4 tokens) for that from 512 tokens on."""
    q, kv, positions, sinks, window = args
    # its own generator: the other calls' random gradients stay as they were without it
    rng = torch.Generator(device=kv.device).manual_seed(3)
    wide = [torch.randn(*t.shape[:-1], 512, device=t.device, generator=rng) for t in (q, kv)]
    layout = block_entries(positions, 4)
    values = torch.randn(*layout.start.shape, 512, device=kv.device, generator=rng)
    picks = _picked(values.bfloat16(), layout, positions, 3, rng)
    half = [t.to(torch.bfloat16) for t in (*wide, sinks)]
    return [half[0], half[1], positions, half[2], window, picks]


# Further calls checked (and built by launch/triton_build) after the example's own, each
# from the example's arguments (on the device, in the dtype they were given, but for a call
# that casts them: held to the doctor's tolerance for its dtype).
MORE_CALLS: dict[str, list[Callable[[list], list]]] = {
    "rope_trailing": [_with_query_norm],
    "moe_route": [_with_sigmoid_scores, _with_chosen_experts, _with_groups],
    "v4_attention": [_with_hca_entries, _with_csa_picks, _with_gathered_csa_picks],
}


def example_calls(op: str, inputs: list) -> list[list]:
    """The argument lists an op is checked with: its example's, then MORE_CALLS'."""
    return [inputs] + [further(inputs) for further in MORE_CALLS.get(op, ())]


# The reference runs in float64 but for ops whose torch kernel has none (F.grouped_mm).
REFERENCE_DTYPE = {"grouped_gemm": torch.float32}
# Ops whose triton implementation has no backward on the CPU (interpreted mode): there only
# the forward is checked, and the result says why (the cpu backend's have one).
NO_CPU_BACKWARD = {"v4_attention": "FlexAttention has no backward on the CPU in torch"}
# Ops that have no gradient at all: only the forward is checked, on every device.
NO_BACKWARD = {"entry_mass": "no gradient (the CSA indexer's target learns nothing back)"}
