"""`train.compile`: torch.compile per transformer block, as torchtitan applies it. It runs after
tensor and expert parallelism and activation checkpointing and before FSDP: each block's own
`forward` is compiled (the module keeps its name, so state dicts and checkpoints do not
change), and the hooks FSDP2 puts on the block (all-gather, reduce-scatter) and the pipeline
schedule stay outside the compiled code. Blocks of one structure share their graphs.

What dynamo could not compile runs eagerly between graphs (a graph break: today only the
`.tolist()` of expert parallelism's all-to-all sizes); the count is reported, never hidden."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch._dynamo.config
from torch import nn

# Graphs one block's forward may need: training, the evaluation's no-grad eval-mode forward,
# a first micro-batch whose mHC statistics start empty, Anticipatory Routing's planned
# routes. Blocks differ by layer kind (and Engram layers by their index), so each can need its
# own set; past dynamo's limit (8 per function) the rest would run eagerly.
GRAPHS_PER_BLOCK = 6


def compile_blocks(slots: list[tuple[nn.Module, str]], backend: str) -> int:
    """Compile the forward of the block at every (parent, attribute) slot in place, with
    dynamo backend `backend`; returns how many were compiled. A block under activation
    checkpointing is compiled with its wrapper: dynamo traces the checkpointed region and the
    backward graph recomputes it (as torchtitan does), instead of re-running compiled code."""
    limit = GRAPHS_PER_BLOCK * len(slots)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    # Statistics a block records (MoE loads, mHC deviations, indexer recall) are side effects
    # that eager checkpointing skips on recompute (model/recompute.py); dynamo refuses them
    # inside a checkpointed region unless told to apply them once, in forward.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for parent, name in slots:
        block = getattr(parent, name)  # with activation checkpointing: its wrapper
        block.forward = torch.compile(block.forward, backend=backend)
    return len(slots)


@dataclass
class CompileStats:
    """What dynamo did so far in this process: graphs compiled and graph breaks (a function
    past the recompile limit is logged by dynamo itself)."""

    graphs: int
    graph_breaks: int

    @staticmethod
    def now() -> CompileStats:
        from torch._dynamo.utils import counters

        return CompileStats(
            graphs=int(counters["stats"]["unique_graphs"]),
            graph_breaks=int(sum(counters["graph_break"].values())),
        )


def describe_compile(summary: dict) -> str:
    """One line from a run summary: what was compiled and what the first step cost."""
    stats, first, median = summary["compile"], summary["first_step_s"], summary["median_step_s"]
    line = (
        f"{stats['blocks']} blocks ({stats['backend']}), {stats['graphs']} graphs, "
        f"{stats['graph_breaks']} graph breaks"
    )
    if first is not None and median is not None:
        line += f"; first step {first:.1f} s (compiling), then {median:.3f} s per step (median)"
    return line
