"""The launcher's agent stopped by a signal: its rendezvous heartbeats stop on the main
thread (launch/spawn.py). Otherwise the heartbeat timer runs on until the handler is freed,
and when its own thread frees it, torch's finalizer fails to join that thread and prints a
traceback into the stderr of a run stopped on purpose (seen once in a SIGTERM test)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.launcher.api import elastic_launch

from birkhoff.launch import spawn
from birkhoff.launch.spawn import elastic_config, stop_rendezvous_heartbeats
from birkhoff.launch.topology import Topology

HEARTBEATS = "RendezvousKeepAliveTimer"


def signal_the_agent(*_args) -> None:
    """A rank that sends SIGTERM to its agent (the launcher), then waits to be stopped."""
    os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(60)


def heartbeat_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(HEARTBEATS)]


@pytest.fixture
def own_signal_handlers():
    """torch's agent installs handlers for SIGTERM and friends in this process: put back
    pytest's for the tests after this one."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for number, handler in kept.items():
        signal.signal(number, handler)


def test_a_signalled_launch_stops_its_rendezvous_heartbeats_here(own_signal_handlers):
    """torch's real agent and c10d rendezvous, one rank: the SIGTERM reaches the launcher as
    SignalException with the rendezvous still beating; the launcher's call finds the handler
    in the agent's frames and stops the timer before returning."""
    assert not heartbeat_threads()
    topology = Topology(nnodes=1, node_rank=0, nproc_per_node=1, rdzv_endpoint=None,
                        rdzv_id="signals", stop_timeout_s=5)  # fmt: skip
    with pytest.raises(SignalException) as stopped:
        elastic_launch(elastic_config(topology), signal_the_agent)()
    assert heartbeat_threads()  # what torch leaves running after a signal
    assert stop_rendezvous_heartbeats(stopped.value)
    assert not heartbeat_threads()


def test_the_launcher_stops_them_before_it_reports_the_signal(own_signal_handlers, monkeypatch):
    """`launch_ranks` itself, its ranks replaced by one that signals the agent: it stops the
    heartbeats through the agent's frames (found: True), exits 128 + 15 and leaves no
    heartbeat thread."""
    monkeypatch.setattr(
        spawn, "elastic_launch", lambda config, _ranks: elastic_launch(config, signal_the_agent)
    )
    found = []
    monkeypatch.setattr(spawn, "stop_rendezvous_heartbeats",
                        lambda stop: found.append(stop_rendezvous_heartbeats(stop)))  # fmt: skip
    topology = Topology(nnodes=1, node_rank=0, nproc_per_node=1, rdzv_endpoint=None,
                        rdzv_id="signals", stop_timeout_s=5)  # fmt: skip
    assert spawn.launch_ranks(topology, {}, "unused", {}) == 128 + signal.SIGTERM
    assert found == [True] and not heartbeat_threads()
