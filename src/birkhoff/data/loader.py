"""Fixed-length training windows, dealt to data-parallel ranks in a seeded global order.

Window i is tokens[i*T : i*T + T + 1] (inputs and shifted targets). Global sample g is window
perm_e[g mod N] with e = g // N and perm_e a permutation seeded by (seed, e): the order is a pure
function of the seed, so the loader's whole state is one cursor, and a global batch is the same
set of samples for any number of ranks (rank r takes the r-th contiguous slice).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchLoader:
    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_windows = (len(tokens) - 1) // seq_len
        self.per_rank = global_batch_size // dp_size
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.cursor = 0  # global samples consumed so far
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def next_batch(self) -> list[Batch]:
        """This rank's share of the next global batch, as micro-batches."""
        start = self.cursor + self.dp_rank * self.per_rank
        windows = [self._window(g) for g in range(start, start + self.per_rank)]
        self.cursor += self.global_batch_size
        stacked = torch.from_numpy(np.stack(windows).astype(np.int64))
        micro = stacked.split(self.micro_batch_size)
        return [(chunk[:, :-1], chunk[:, 1:]) for chunk in micro]

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "seed": self.seed, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["num_windows"] != self.num_windows:
            raise ValueError(
                f"loader state is for seed={state['seed']} with {state['num_windows']} windows, "
                f"this loader has seed={self.seed} with {self.num_windows}: different data"
            )
        self.cursor = state["cursor"]

    def _window(self, global_index: int) -> np.ndarray:
        epoch, position = divmod(global_index, self.num_windows)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch_order = (epoch, order)
        start = int(self._epoch_order[1][position]) * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]


def heldout_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int, dp_rank: int, dp_size: int
) -> Iterator[Batch]:
    """The first windows of the held-out stream in order, split evenly across ranks."""
    num_windows = (len(tokens) - 1) // seq_len
    per_rank = batch_size // dp_size
    usable = min(num_batches, num_windows // batch_size)
    for b in range(usable):
        first = b * batch_size + dp_rank * per_rank
        rows = [
            tokens[w * seq_len : w * seq_len + seq_len + 1] for w in range(first, first + per_rank)
        ]
        chunk = torch.from_numpy(np.stack(rows).astype(np.int64))
        yield chunk[:, :-1], chunk[:, 1:]
