"""A keyed pseudo-random permutation of [0, n) that needs no memory: a Feistel network on the
smallest even-bit domain >= n, cycle-walked back into range. Shuffling a billion windows costs
nothing up front, and any index is mapped on its own (random access for resume and workers)."""

from __future__ import annotations

import numpy as np

ROUNDS = 4


def permute(indices: np.ndarray, n: int, key: tuple[int, ...]) -> np.ndarray:
    """The images of `indices` (all in [0, n)) under the permutation named by `key`."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    round_keys = np.random.default_rng(list(key)).integers(0, 2**63, ROUNDS, dtype=np.uint64)
    values = _feistel(np.asarray(indices, dtype=np.uint64), half, round_keys)
    outside = values >= n
    while outside.any():  # cycle walking: the cycle through an in-range value returns in range
        values[outside] = _feistel(values[outside], half, round_keys)
        outside = values >= n
    return values.astype(np.int64)


def _feistel(values: np.ndarray, half: int, round_keys: np.ndarray) -> np.ndarray:
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    left, right = values >> shift, values & mask
    for round_key in round_keys:
        left, right = right, left ^ (_mix(right ^ round_key) & mask)
    return (left << shift) | right


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit affects every output bit."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
