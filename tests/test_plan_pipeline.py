"""The planner's pipeline schedules (parallel/planning/pipeline_schedule.py) against the closed
forms the schedules' papers give: the bubble of GPipe and 1F1B (p - 1) / (m + p - 1), of
interleaved 1F1B with v chunks (p - 1) / (v m + p - 1) (Narayanan et al. 2021), zero bubble's
idle time (p - 1) (T_F + T_B - T_W) (Qi et al. 2023, ZB-1P); the micro-batches a rank holds
in flight: 1F1B p - rank, interleaved Megatron's warm-up count 2 (p - rank - 1) + (v - 1) p,
plus one, and zero bubble as many as 1F1B (p micro-batches of the whole model)."""

from __future__ import annotations

import pytest
from test_plan import DENSE

from birkhoff.parallel.planning.cluster import Cluster
from birkhoff.parallel.planning.estimate import estimate
from birkhoff.parallel.planning.inventory import build_inventory
from birkhoff.parallel.planning.layout import Layout, Workload
from birkhoff.parallel.planning.pipeline_schedule import (
    COST,
    activation_peak,
    bubble,
    rank_orders,
)
from birkhoff.parallel.planning.search import plan

SHAPES = [(2, 4), (4, 8), (4, 16), (8, 32), (3, 6)]  # (pp, micro-batches)


def in_flight(order, stages: int) -> float:
    """The most chunk forwards a rank keeps (each saving 1, nothing else held)."""
    ones = dict.fromkeys(range(stages), 1.0)
    zeros = dict.fromkeys(range(stages), 0.0)
    return activation_peak(order, ones, zeros, zeros)


@pytest.mark.parametrize(("pp", "m"), SHAPES)
def test_one_chunk_schedules(pp, m):
    for schedule in ("gpipe", "1f1b"):
        orders = rank_orders(schedule, pp, 1, m)
        assert bubble(orders, (1.0,) * pp) == pytest.approx((pp - 1) / (m + pp - 1))
    assert [in_flight(o, pp) for o in rank_orders("1f1b", pp, 1, m)] == [
        min(pp - rank, m) for rank in range(pp)
    ]
    assert {in_flight(o, pp) for o in rank_orders("gpipe", pp, 1, m)} == {m}


@pytest.mark.parametrize("m", [2, 4, 8])
def test_uneven_stages_bubble_is_the_busiest_ranks(m):
    """1F1B on 2 ranks, stage costs a = 2 and b = 1 (forward a, backward 2a): rank 0 waits
    once, for stage 1's first forward and backward beyond its own second forward (3b - a),
    then never again; its idle share is (3b - a) / (3ma + 3b - a)."""
    a, b = 2.0, 1.0
    idle = 3 * b - a
    assert bubble(rank_orders("1f1b", 2, 1, m), (a, b)) == pytest.approx(idle / (3 * m * a + idle))


@pytest.mark.parametrize("chunks", [2, 3])
@pytest.mark.parametrize(("pp", "m"), SHAPES)
def test_interleaved_1f1b(pp, m, chunks):
    orders = rank_orders("interleaved_1f1b", pp, chunks, m)
    stages = pp * chunks
    assert bubble(orders, (1.0,) * stages) == pytest.approx((pp - 1) / (chunks * m + pp - 1))
    warmup = [2 * (pp - rank - 1) + (chunks - 1) * pp for rank in range(pp)]
    assert [in_flight(o, stages) for o in orders] == [min(w + 1, m * chunks) for w in warmup]


@pytest.mark.parametrize(("pp", "m"), [s for s in SHAPES if s[1] % s[0] == 0])
def test_zero_bubble(pp, m):
    chunks = 2
    orders = rank_orders("zero_bubble", pp, chunks, m)
    stages = pp * chunks
    work = m * chunks * (COST["F"] + COST["I"] + COST["W"])
    idle = (pp - 1) * (COST["F"] + COST["I"] - COST["W"])
    assert bubble(orders, (1.0,) * stages) == pytest.approx(idle / (work + idle))
    assert {in_flight(o, stages) for o in orders} == {pp * chunks}


def test_weight_backward_frees_what_input_backward_left():
    """A zero-bubble rank's peak counts the gradients each input backward leaves for its
    weight backward while both are pending: with 1 byte per pending gradient the peak rises
    by the most input backwards outstanding at once."""
    (order, *_) = rank_orders("zero_bubble", 2, 2, 4)
    zeros = dict.fromkeys(range(4), 0.0)
    ones = dict.fromkeys(range(4), 1.0)
    outstanding = most = 0
    for action in order:
        outstanding += {"I": 1, "W": -1}.get(action.kind, 0)
        most = max(most, outstanding)
    assert activation_peak(order, zeros, ones, zeros) == most > 0


def test_plan_offers_the_multi_chunk_schedules():
    """With 8 layers on 8 devices the search runs interleaved 1F1B and zero bubble too, and
    on the same layout zero bubble's step is shorter (its bubble is smaller) than 1F1B's."""
    cfg = DENSE.__class__(**{**DENSE.__dict__, "num_layers": 8})
    inv = build_inventory(cfg)
    work = Workload(global_batch=32, seq_len=64)
    cluster = Cluster("test", 8, 80, 1000, 400, 50, 8)
    schedules = {
        (e.layout.pp_schedule, e.layout.pp_stages_per_rank) for e in plan(inv, work, cluster)
    }
    assert {("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2)} <= schedules
    base = Layout(pp=4, dp_shard=2, micro_batch=1)
    steps = {
        schedule: estimate(inv, Layout(**{**base.__dict__, "pp_schedule": schedule,
                                          "pp_stages_per_rank": chunks}), work, cluster)
        for schedule, chunks in (("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2))
    }  # fmt: skip
    assert steps["zero_bubble"].bubble < steps["interleaved_1f1b"].bubble < steps["1f1b"].bubble
