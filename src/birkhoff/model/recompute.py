"""Whether a forward is the re-run that activation checkpointing does inside backward.

Modules that keep statistics (MoE loads, mHC deviations) record them only on the first run,
so a checkpointed step counts every token once and re-runs the same ops."""

from __future__ import annotations

import torch


def recomputing() -> bool:
    return torch._C._current_graph_task_id() != -1
