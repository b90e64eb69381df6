"""A pipeline schedule as the planner sees it: the order of compute actions on each rank, and
what that order costs in activation memory and idle time.

The multi-chunk schedules (interleaved 1F1B, zero bubble) take their order from torch's own
schedule classes, the ones the trainer runs, so the plan follows whatever torch does; GPipe
and 1F1B, which run one stage per rank, are written out (all forwards then all backwards;
pp - rank forwards in flight, then one backward per forward). Memory walks each rank's order:
a forward keeps its stage's saved tensors until the backward that frees them; zero bubble's
input backward keeps the graph alive and adds the gradients its deferred weight backward
starts from, both freed by that weight backward. Time simulates the order with every action
waiting for the actions it depends on (the previous stage's forward, the next stage's
backward), forward 1, backward 2 (input and weight backward 1 each) per layer of the stage;
the bubble is the idle share of the busiest rank's span.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from torch.distributed.pipelining.schedules import (
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

MULTI_CHUNK = {
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}
# action kinds: forward, full backward, backward of the inputs, backward of the weights
COST = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}


@dataclass(frozen=True)
class Action:
    kind: str  # F, B, I or W
    stage: int
    micro: int


@lru_cache(maxsize=256)  # a plan's search asks for the same few orders many times
def rank_orders(schedule: str, pp: int, chunks: int, micro_batches: int) -> tuple:
    """Per pipeline rank, its compute actions in the order the schedule runs them."""
    if schedule in MULTI_CHUNK:
        return _torch_orders(MULTI_CHUNK[schedule], pp, chunks, micro_batches)
    orders = []
    for rank in range(pp):
        forwards = [Action("F", rank, m) for m in range(micro_batches)]
        backwards = [Action("B", rank, m) for m in range(micro_batches)]
        if schedule == "gpipe":
            orders.append(tuple(forwards + backwards))
            continue
        warmup = min(pp - rank, micro_batches)
        order = forwards[:warmup]
        for m in range(micro_batches):
            order.append(backwards[m])
            if warmup + m < micro_batches:
                order.append(forwards[warmup + m])
        orders.append(tuple(order))
    return tuple(orders)


def _torch_orders(schedule_class, pp: int, chunks: int, micro_batches: int) -> tuple:
    """The order torch's schedule computes in its constructor, without the stages it needs
    at run time (the constructor's arithmetic only reads these attributes)."""
    schedule = object.__new__(schedule_class)
    schedule.pp_group_size, schedule.n_local_stages = pp, chunks
    schedule._n_microbatches = micro_batches
    schedule.number_of_rounds = max(1, micro_batches // pp)
    schedule.microbatches_per_round = micro_batches // schedule.number_of_rounds
    order = {rank: schedule._calculate_single_rank_operations(rank) for rank in range(pp)}
    if schedule_class is ScheduleInterleavedZeroBubble:
        schedule.pipeline_order = order
        order = schedule._add_bubbles_to_actions(pp * chunks)
    return tuple(
        tuple(
            Action(a.computation_type.value, a.stage_index, a.microbatch_index)
            for a in order[rank]
            if a is not None
        )
        for rank in range(pp)
    )


def activation_peak(
    order: tuple[Action, ...], saved: dict[int, float], pending: dict[int, float], transient: dict
) -> float:
    """The most a rank's live activations reach over `order`: per stage, the bytes a forward
    saves, the gradients an input backward leaves for its weight backward, and what a
    backward briefly adds on top (recomputation, the loss's gradients)."""
    live = peak = 0.0
    for action in order:
        s = action.stage
        if action.kind == "F":
            live += saved[s]
            peak = max(peak, live)
        elif action.kind in "BI":
            peak = max(peak, live + transient[s])
            if action.kind == "B":
                live -= saved[s]
            else:
                live += pending[s]
                peak = max(peak, live)
        else:
            live -= saved[s] + pending[s]
    return peak


@lru_cache(maxsize=256)
def bubble(orders: tuple, stage_cost: tuple[float, ...]) -> float:
    """Idle share of the busiest rank when every action starts as soon as its rank is free
    and its inputs exist (communication taking no time)."""
    num_stages = 1 + max(a.stage for order in orders for a in order)
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * len(orders)
    busy = [0.0] * len(orders)
    position = [0] * len(orders)
    remaining = sum(len(order) for order in orders)
    while remaining:
        progressed = False
        for rank, order in enumerate(orders):
            while position[rank] < len(order):
                action = order[position[rank]]
                ready = _ready(action, done, num_stages)
                if ready is None:
                    break
                start = max(free[rank], ready)
                cost = COST[action.kind] * stage_cost[action.stage]
                free[rank] = start + cost
                busy[rank] += cost
                done[(action.kind, action.stage, action.micro)] = free[rank]
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError("pipeline order deadlocks")
    rank = max(range(len(orders)), key=lambda r: busy[r])
    return 1.0 - busy[rank] / max(free)


def _ready(action: Action, done: dict, num_stages: int) -> float | None:
    """When `action`'s inputs exist, or None if one is not computed yet."""
    s, m = action.stage, action.micro
    needs = []
    if action.kind == "F" and s > 0:
        needs.append([("F", s - 1, m)])
    if action.kind in "BI":
        needs.append([("F", s, m)])
        if s < num_stages - 1:  # the next stage's input gradient, from either backward
            needs.append([("B", s + 1, m), ("I", s + 1, m)])
    if action.kind == "W":
        needs.append([("I", s, m)])
    times = []
    for alternatives in needs:
        found = [done[key] for key in alternatives if key in done]
        if not found:
            return None
        times.append(min(found))
    return max(times, default=0.0)
