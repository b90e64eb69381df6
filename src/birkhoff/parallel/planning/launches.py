"""Kernel launches of one micro-batch's forward and backward in eager mode, counted.

Every aten op that runs a kernel is one launch on an accelerator (views and allocations are
none); in eager PyTorch the host spends about the same time on each (dispatch, autograd, the
launch itself), so a step whose device work is small is bound by the host.

How many ops a model runs does not depend on its widths, except through CSA's forms (its
picks gathered or taken as a mask over every entry, `v4_attention.picks_as_mask`: the count
runs the real shape's, `csa_forms`) and three loops that bound their memory: the CSA
indexer picks for a block of queries at a time (`compression.queries_per_block`),
`entry_mass` sums the attention at a block of queries at a time
(`v4_attention.mass_queries_per_block`), and the loss takes its vocabulary logits a chunk of
tokens at a time (`linear_cross_entropy.chunk_tokens`); their block sizes depend on heads,
widths, entries, the vocabulary and the micro-batch. So the count is taken on a copy of the
recipe's model with every width narrowed (the same layers, layer kinds, experts, streams,
Engram orders and heads), two short sequences on this CPU with the reference kernels: once
with every loop run once, then once per loop with that loop taking two queries (or tokens)
at a time (the functions that size the blocks are replaced while counting); the difference
is what one more iteration launches. `launches_per_micro_batch` adds each loop's iterations
at the real shape. tests/test_plan_launches.py checks the total against a count of the model
itself at full width, with loops of many blocks (within 0.1%: einsum's path, and so its op
count, varies a little with the block's shape). The optimizer's step is counted once on the
same narrowed copy when the caller hands over how the trainer builds it (`birkhoff plan`
does; planning does not import the trainer): Muon's, 1,614 at `tiny`, are mostly its
Newton-Schulz runs (`orthogonalise`, one per shape of matrix), which are counted apart, so
that a rank is charged only the runs it makes (muon.optimizer_launches). Collectives are not
counted.

The kernels counted are a backend's: the reference runs here; for `triton` the model still
runs the reference, and each op triton implements is charged per call what triton's op
launches (counted_ops.py), but V4 attention's core and the loss (LEFT_ON_REFERENCE there);
for `npu` (torch_npu runs only where CANN is installed) the reference's are counted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from unittest import mock

import torch
from torch import nn

from birkhoff.kernels import indexer_loss as index_kernel
from birkhoff.kernels import linear_cross_entropy as loss_kernel
from birkhoff.kernels import v4_attention as attention_kernel
from birkhoff.kernels.launch_counter import LaunchCounter
from birkhoff.model import build_model, compression
from birkhoff.model.budget import apply_sparse_budget
from birkhoff.model.config import ModelConfig
from birkhoff.model.mhc import residual_stats
from birkhoff.parallel.planning.counted_ops import CountedOps, charged

UNBOUNDED = 1 << 62
# loop: (module, the function that sizes its blocks from its memory budget)
LOOPS = {
    "indexer": (compression, "queries_per_block"),
    "entry_mass": (attention_kernel, "mass_queries_per_block"),
    "loss": (loss_kernel, "chunk_tokens"),
}
FORCED_BLOCK = 2  # not 1: einsum takes a shorter path for a block of one query


@dataclass
class LaunchCount:
    """A micro-batch's launches with every budgeted loop run once, and what one more
    iteration of each loop launches, summed over the model's layers."""

    once: int = 0
    per_iteration: dict[str, int] = field(default_factory=dict)
    optimizer: int = 0  # one optimizer step of the whole model (0: not counted)
    kernels: str = "reference"  # the backend asked for (npu's counted as the reference's)
    # Muon's Newton-Schulz runs in that step, counted in it: "matrix" or "stack" (several
    # batched) -> [runs, launches]; a rank runs only the matrices it owns (muon.py)
    orthogonalised: dict[str, list[int]] = field(default_factory=dict)
    # launches of one run of each kind, whatever its shape (the narrowed model batches
    # shapes that the model's own widths keep apart: its step may lack a kind)
    launches_per_run: dict[str, int] = field(default_factory=dict)


def narrowed(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with its sparse budget resolved and every width small: a hidden size of 2
    channels a head with V4 attention (its heads have their own width), 8 with GQA."""
    cfg = apply_sparse_budget(cfg)
    a, moe, engram = cfg.attention, cfg.moe, cfg.engram
    return replace(
        cfg,
        vocab_size=256,
        hidden_size=(2 if cfg.attention.kind == "v4" else 8) * cfg.num_heads,
        ffn_hidden_size=32,
        sparse_budget=None,
        attention=replace(
            a, head_dim=16, rope_head_dim=8, q_lora_rank=16, o_lora_rank=16, index_head_dim=16
        ),
        moe=replace(moe, expert_ffn_hidden_size=16),
        engram=replace(engram, table_size=min(engram.table_size, 97), embed_dim=8),
    )


def counted_length(cfg: ModelConfig, seq_len: int) -> int:
    """The sequence the count runs: long enough for every window, CSA and HCA entry path."""
    a = cfg.attention
    shortest = 2 * max(a.sliding_window, a.hca_ratio, a.csa_ratio) if a.kind == "v4" else 64
    return min(seq_len, shortest)


def count_launches(
    cfg: ModelConfig,
    seq_len: int,
    narrow: bool = True,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    kernels: str = "reference",
) -> LaunchCount:
    """Launches of a micro-batch's forward, loss and backward with `kernels` (a backend:
    the reference runs here; triton's own ops are counted per call, counted_ops.py; npu's
    as the reference's), every
    budgeted loop once, and one more iteration of each (see the module docstring); with
    `optimizer` (the trainer's, built for a model), one optimizer step after its first (which
    creates the state)."""
    model_cfg = narrowed(cfg) if narrow else cfg
    model = build_model(model_cfg, seed=0)
    # npu's ops run only where CANN is installed: the reference's are counted for them
    counted_ops = CountedOps(model, "reference" if kernels == "npu" else kernels)
    seq = counted_length(model_cfg, seq_len)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, seq), generator=generator)

    forms = csa_forms(cfg, seq_len)

    def launches(per_query: str | None) -> tuple[int, Counter[tuple[str, str]]]:
        counter = counted_ops.counter = LaunchCounter()
        with ExitStack() as patches, counter:
            for module, masked in zip((attention_kernel, index_kernel), forms, strict=True):
                choice = lambda *_, masked=masked: masked  # noqa: E731
                patches.enter_context(mock.patch.object(module, "picks_as_mask", choice))
            for loop, (module, sizing) in LOOPS.items():
                block = FORCED_BLOCK if loop == per_query else UNBOUNDED
                patches.enter_context(
                    mock.patch.object(module, sizing, lambda *_, b=block, **__: b)
                )
            model(tokens, tokens.roll(-1, dims=1)).backward()
        # each count a step's first micro-batch: no gradient to add to, no H_res maximum
        model.zero_grad(set_to_none=True)
        residual_stats(model)
        return counter.launches, counted_ops.take()

    runs = {None: launches(None)}
    # iterations with a forced block: of queries (of every sequence at once), of tokens;
    # without V4 attention only the loss loops
    forced = {"loss": math.ceil(tokens.numel() / FORCED_BLOCK)}
    if model_cfg.attention.kind == "v4":
        forced |= dict.fromkeys(("indexer", "entry_mass"), math.ceil(seq / FORCED_BLOCK))
    runs |= {loop: launches(loop) for loop, blocks in forced.items() if blocks > 1}
    per_call = counted_ops.launches_per_call()
    total = {run: aten + charged(tally, per_call) for run, (aten, tally) in runs.items()}
    once = total[None]
    per_iteration = dict.fromkeys(LOOPS, 0)
    for loop, blocks in forced.items():
        if blocks > 1:
            per_iteration[loop] = round((total[loop] - once) / (blocks - 1))
    steps, orthogonalised, per_run = 0, {}, {}
    if optimizer is not None:
        model(tokens, tokens.roll(-1, dims=1)).backward()
        built = optimizer(model)
        built.step()  # the first step creates the state: not a step's cost
        counter = LaunchCounter()
        if hasattr(built, "orthogonalise"):  # Muon: its Newton-Schulz runs, apart
            per_run = _launches_per_run(built)
            orthogonalised = _count_orthogonalise(built, counter)
        with counter:
            built.step()
        steps = counter.launches + sum(total for _, total in orthogonalised.values())
    return LaunchCount(once, per_iteration, steps, kernels, orthogonalised, per_run)


def run_kind(matrices: int) -> str:
    """A Newton-Schulz run's kind by how many matrices it takes: a stack (routed experts,
    batched: more launches a run) or a single matrix."""
    return "stack" if matrices > 1 else "matrix"


def _launches_per_run(optimizer) -> dict[str, int]:
    """Launches of one Newton-Schulz run of one matrix and of a batch of two (the counts do
    not depend on the sizes), with the optimizer's work counter left as it was."""
    done = optimizer.orthogonalised
    per_run = {}
    for kind, shape in (("matrix", (3, 5)), ("stack", (2, 3, 5))):
        probe = torch.ones(shape)
        with LaunchCounter() as counter:
            optimizer.orthogonalise(probe, 1.0)
        per_run[kind] = counter.launches
    optimizer.orthogonalised = done
    return per_run


def _count_orthogonalise(optimizer, outer: LaunchCounter) -> dict[str, list[int]]:
    """Has `optimizer.orthogonalise` (one Newton-Schulz run) counted apart from `outer`:
    calls and launches of single matrices and of stacks (batched: more launches a run)."""
    runs = {"matrix": [0, 0], "stack": [0, 0]}
    orthogonalise = optimizer.orthogonalise

    def counted(matrices: torch.Tensor, rms: float) -> torch.Tensor:
        tally = runs[run_kind(matrices[..., 0, 0].numel())]
        with outer.pause(), LaunchCounter() as inner:
            update = orthogonalise(matrices, rms)
        tally[0] += 1
        tally[1] += inner.launches
        return update

    optimizer.orthogonalise = counted
    return runs


def csa_forms(cfg: ModelConfig, seq_len: int) -> tuple[bool, bool]:
    """Whether CSA's attention and its indexer take their picks as a mask over every entry
    (`v4_attention.picks_as_mask`) at the real shape, with all heads: a narrowed copy could
    decide otherwise. (Tensor parallelism's fewer heads per process can turn a gather into a
    mask, never the reverse: the activation terms take a rank's heads, activations.py; the
    count keeps the forms of all heads.)"""
    cfg = apply_sparse_budget(cfg)
    a = cfg.attention
    entries = seq_len // a.csa_ratio if a.kind == "v4" else 0
    picks = min(a.index_topk, entries)
    return (
        attention_kernel.picks_as_mask(cfg.num_heads, entries, picks, a.head_dim),
        attention_kernel.picks_as_mask(a.index_heads, entries, picks, a.index_head_dim),
    )


def loop_iterations(cfg: ModelConfig, micro_batch: int, seq_len: int, tp: int) -> dict[str, int]:
    """Iterations of each budgeted loop per call at the real shape (this process's heads
    under tensor parallelism), in the forms `csa_forms` gives: `entry_mass` takes every
    entry where the attention does."""
    attention_masked, _ = csa_forms(cfg, seq_len)
    cfg = apply_sparse_budget(cfg)
    a = cfg.attention
    entries = seq_len // a.csa_ratio if a.kind == "v4" else 0
    index_block = compression.queries_per_block(entries, max(1, a.index_heads // tp), micro_batch)
    picks = min(a.index_topk, entries)
    heads = max(1, cfg.num_heads // tp)
    width = entries if attention_masked else picks
    mass_block = attention_kernel.mass_queries_per_block(
        micro_batch, heads, width, a.head_dim, picked=not attention_masked
    )
    chunk = loss_kernel.chunk_tokens(cfg.vocab_size)
    return {
        "indexer": math.ceil(seq_len / index_block),
        "entry_mass": math.ceil(seq_len / mass_block),
        "loss": math.ceil(micro_batch * seq_len / chunk),
    }


def launches_per_micro_batch(
    count: LaunchCount, cfg: ModelConfig, micro_batch: int, seq_len: int, tp: int
) -> int:
    """The whole model's launches for one micro-batch of `micro_batch` x `seq_len` tokens."""
    iterations = loop_iterations(cfg, micro_batch, seq_len, tp)
    extra = sum(count.per_iteration.get(loop, 0) * (n - 1) for loop, n in iterations.items())
    return count.once + extra
