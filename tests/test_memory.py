"""What a rank holds and the allocator's peak (parallel/memory.py), against byte counts
written out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from birkhoff.parallel.memory import AllocatedPeak, held_bytes

MB = 1_000_000  # float32 tensors of 250,000 elements


def block() -> torch.Tensor:
    return torch.ones(250_000)


def test_the_peak_counts_what_is_allocated_after_start_and_what_start_frees():
    earlier, kept = block(), block()  # 2 MB held before the measurement
    with AllocatedPeak(torch.device("cpu")) as allocated:
        warm = block() * 2  # allocated before start: part of the level start measures from
        allocated.start()
        del warm  # -1 MB (seen: it was allocated while profiling)
        a = block()  # +1 (the level again), and ones() allocates once
        b = a + 1  # +1
        c = a * b  # +1: 2 MB above the level at start, the peak
        del a, b, c
        d = block()  # +1 after the peak
        del d, earlier  # freeing what came before the profiler changes nothing seen
    assert allocated.peak_bytes == pytest.approx(2 * MB, abs=1024)  # and a few small ones
    assert kept.numel()


def test_the_peak_without_start_is_measured_from_entry():
    with AllocatedPeak(torch.device("cpu")) as allocated:
        a = block()
        b = a.clone()
        del a
        c = b * 3  # two blocks at once at most
        del b, c
    assert allocated.peak_bytes == pytest.approx(2 * MB, abs=1024)  # and a few small ones


def test_held_bytes_counts_a_shared_storage_once_and_each_kind_apart():
    model = nn.Sequential(nn.Embedding(1000, 250), nn.Linear(250, 1000, bias=False))
    # two parameters over one 1 MB storage (`parameters()` would already drop a second
    # reference to the same parameter object, so only the storage can tell them apart)
    model[1].weight = nn.Parameter(model[0].weight.detach())
    model.register_buffer("scale", torch.ones(1000))  # 4 kB
    optimizer = torch.optim.AdamW(model.parameters())
    model[0](torch.tensor([1, 2])).sum().backward()  # a gradient for one of them
    optimizer.step()
    assert held_bytes([model], [optimizer]) == {
        "params": MB,
        "grads": MB,
        "optimizer": 2 * MB + 4,  # exp_avg, exp_avg_sq and the float32 step scalar
        "buffers": 4000,
    }
