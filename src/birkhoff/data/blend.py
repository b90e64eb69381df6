"""Weighted mixing of sources by sample: each training sequence comes from one source.

The choice is deterministic and greedy (as Megatron's blended datasets): sample g goes to the
source furthest below its share, argmax_s (w_s * (g + 1) - taken_s), so after any number of
samples every source is within one sample of its weight. The state is the per-source count.
"""

from __future__ import annotations

import numpy as np


class BlendSchedule:
    def __init__(self, weights: list[float]) -> None:
        total = float(sum(weights))
        self.weights = np.asarray(weights, dtype=np.float64) / total

    def assign(self, counts: np.ndarray, num_samples: int) -> np.ndarray:
        """Sources of the next `num_samples` samples; advances `counts` (int64, per source)."""
        chosen = np.empty(num_samples, dtype=np.int64)
        taken = int(counts.sum())
        for i in range(num_samples):
            source = int(np.argmax(self.weights * (taken + 1) - counts))
            counts[source] += 1
            chosen[i] = source
            taken += 1
        return chosen
