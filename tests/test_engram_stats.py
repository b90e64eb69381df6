"""Engram statistics (train/engram_stats.py) against a per-token loop and a set of rows."""

import copy
import dataclasses
import math

import pytest
import torch
from test_engram import CFG, make_engram

from birkhoff.model.config import ModelConfig
from birkhoff.parallel.distributed import DistributedContext
from birkhoff.train.engram_stats import EngramStats


def gate_by_hand(engram, tokens, streams) -> list[float]:
    """alpha_m(t) = sigmoid(signed_sqrt(<h/rms(h), k/rms(k)> / sqrt(C))), one token at a time."""
    rows = engram.hash_tokens(tokens)[0].tolist()
    table = engram.table.weight.double()
    key = engram.key.weight.double()
    n, c = streams.shape[-2], streams.shape[-1]
    gates = []
    for t, token_rows in enumerate(rows):
        memory = torch.cat([table[r] for r in token_rows])
        for m in range(n):
            k = key[m * c : (m + 1) * c] @ memory
            h = streams[0, t, m].double()
            k = k / math.sqrt((k * k).mean().item() + 1e-6)
            h = h / math.sqrt((h * h).mean().item() + 1e-6)
            s = (h * k).sum().item() / math.sqrt(c)
            gates.append(1 / (1 + math.exp(-math.copysign(math.sqrt(abs(s)), s))))
    return gates


def one_engram_model(backend: str = "reference"):
    """(Engram layer 0 in training mode, a model holding it, its config, one process)."""
    engram = make_engram(backend=backend).train()
    cfg = dataclasses.replace(ModelConfig(), engram=CFG)
    return engram, torch.nn.ModuleDict({"engram": engram}), cfg, DistributedContext(0, 0, 1, None)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])  # triton: interpreted
def test_gate_mean_and_rows_touched_against_a_loop_and_a_set(backend):
    """The gates each backend's merge returns, summed over the first sequence."""
    engram, model, cfg, ctx = one_engram_model(backend)
    first, second = torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (3, 5))
    streams = [torch.randn(2, 6, 4, 16), torch.randn(3, 5, 4, 16)]
    engram(streams[0], first)
    engram(streams[1], second)
    engram.eval()
    engram(torch.randn(2, 6, 4, 16), torch.randint(0, 64, (2, 6)))  # not counted: evaluation
    stats = EngramStats().take([model], ctx, cfg)
    gates = gate_by_hand(engram, first, streams[0]) + gate_by_hand(engram, second, streams[1])
    assert math.isclose(stats["engram_gate_mean.0"], sum(gates) / len(gates), rel_tol=1e-5)
    seen = {r for batch in (first, second) for r in engram.hash_tokens(batch).flatten().tolist()}
    rows = int(engram.primes.sum())
    assert math.isclose(stats["engram_rows_touched.0"], len(seen) / rows, rel_tol=1e-9)
    assert stats["engram_rows_touched"] == stats["engram_rows_touched.0"]
    # The gates are taken (counted once); the rows stay counted.
    again = EngramStats().take([model], ctx, cfg)
    assert "engram_gate_mean.0" not in again
    assert again["engram_rows_touched.0"] == stats["engram_rows_touched.0"]


def test_a_resumed_run_carries_the_gate_sums_since_the_last_evaluation():
    """A checkpoint between two evaluations keeps the gate sums gathered so far: a fresh
    model and EngramStats loaded from it report at the next evaluation what the run that
    went on reports (the gates of both batches, not only those after the resume)."""
    engram, model, cfg, ctx = one_engram_model()
    first, second = torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (3, 5))
    streams = [torch.randn(2, 6, 4, 16), torch.randn(3, 5, 4, 16)]
    engram(streams[0], first)
    went_on = EngramStats()
    state = went_on.state([model], ctx, cfg)  # the checkpoint: nothing taken
    resumed_model = copy.deepcopy(model)
    resumed_model["engram"].gate_stats = resumed_model["engram"].rows_touched = None
    engram(streams[1], second)
    expected = went_on.take([model], ctx, cfg)
    resumed = EngramStats()
    resumed.load([resumed_model], ctx, state)
    resumed_model["engram"](streams[1], second)
    got = resumed.take([resumed_model], ctx, cfg)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-12), key
    gates = gate_by_hand(engram, first, streams[0]) + gate_by_hand(engram, second, streams[1])
    assert math.isclose(got["engram_gate_mean"], sum(gates) / len(gates), rel_tol=1e-5)
    assert resumed.carried is None and "engram_gate_mean" not in resumed.take(
        [resumed_model], ctx, cfg
    )
