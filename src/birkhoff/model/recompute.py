"""Whether a forward is the re-run that activation checkpointing does inside backward.

Modules that keep statistics (MoE loads, mHC deviations) record them only on the first run,
so a checkpointed step counts every token once and re-runs the same ops.

Compiled blocks (train.compile) are never re-run: dynamo traces the checkpointed block once,
and the recompute is part of the backward graph AOTAutograd derives from it, which replays
tensor ops only (the statistics' updates are applied once, by the forward graph)."""

from __future__ import annotations

import torch


def recomputing() -> bool:
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1
