"""Start the ranks of this node with torchrun's elastic launcher (torch.distributed.launcher)."""

from __future__ import annotations

import logging
import signal
import sys
import tempfile
import uuid
from typing import Any

from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig as ElasticConfig
from torch.distributed.launcher.api import elastic_launch

from birkhoff.launch.topology import Topology
from birkhoff.train import run_rank
from birkhoff.train.rank_errors import rank_errors


def elastic_config(topology: Topology) -> ElasticConfig:
    """The settings torchrun derives from its flags (a single node meets on localhost)."""
    single_node = topology.nnodes == 1 and topology.rdzv_endpoint is None
    return ElasticConfig(
        min_nodes=topology.nnodes,
        max_nodes=topology.nnodes,
        nproc_per_node=topology.nproc_per_node,
        run_id=str(uuid.uuid4()) if single_node else topology.rdzv_id,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if single_node else topology.rdzv_endpoint,
        rdzv_configs={"is_host": topology.node_rank == 0},
        max_restarts=topology.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        shutdown_timeout=topology.stop_timeout_s,
    )


def launch_ranks(
    topology: Topology, recipe: dict[str, Any], run_dir: str, public_recipe: dict[str, Any]
) -> int:
    """Run every local rank of this node to completion. Returns the exit status: 0; 2 when a
    rank stopped on purpose (its one-line reason is printed once); 1 after another failure
    (the tracebacks are printed); or 128 + N after signal N, which the launcher passed to the
    ranks (they finish their step and checkpoint, or are killed after stop_timeout_s).
    `public_recipe` is `recipe` scrubbed of secrets, the only one the ranks write."""
    # The launcher reports failures and signals itself, once; torch's agent would log each
    # rank's exit with a traceback of its own polling code, and each process it stops.
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="birkhoff-rank-errors-") as error_dir:
        try:
            elastic_launch(elastic_config(topology), run_rank)(
                recipe, run_dir, None, public_recipe, error_dir
            )
        except SignalException as stop:
            stop_rendezvous_heartbeats(stop)
            name = signal.Signals(stop.sigval).name
            _report_failure(error_dir, None)  # a rank that failed while stopping says why
            print(
                f"birkhoff: {name}: passed to the ranks, which had {topology.stop_timeout_s} s "
                "(launch.stop_timeout_s) to finish their step and checkpoint; resume with "
                "train.resume=auto in the same run dir",
                file=sys.stderr,
                flush=True,
            )
            return 128 + int(stop.sigval)
        except ChildFailedError as failed:
            return _report_failure(error_dir, failed)
    return 0


def stop_rendezvous_heartbeats(stop: SignalException) -> bool:
    """Stop the keep-alive heartbeats of the rendezvous the stopped agent used, here on the
    main thread (waiting for a heartbeat in flight: at most its timeout, torch's default 5
    s); True where the agent's rendezvous handler was found. On a signal torch's agent leaves
    the rendezvous open (other nodes may go on without this one) and its heartbeat timer
    running; the timer is stopped by a finalizer when the handler is freed, and when the
    timer's own thread frees it (it holds the handler while a heartbeat is sent) the
    finalizer cannot join that thread:
    "Exception ignored ... cannot join current thread", a traceback in the stderr of a run
    stopped on purpose. The handler is found in the agent's frames (launch_agent's WorkerSpec)."""
    frame = stop.__traceback__
    while frame is not None:
        for value in frame.tb_frame.f_locals.values():
            handler = value.rdzv_handler if isinstance(value, WorkerSpec) else None
            if hasattr(handler, "_stop_heartbeats"):  # torch's dynamic (c10d) rendezvous
                handler._stop_heartbeats()
                return True
        frame = frame.tb_next
    return False


def _report_failure(error_dir: str, failed: ChildFailedError | None) -> int:
    hangs, reasons, tracebacks = rank_errors(error_dir)
    for line in hangs:  # where each rank was when its hang watchdog fired
        print(f"birkhoff: {line}", file=sys.stderr, flush=True)
    if hangs:
        return 1
    for reason in reasons:  # what ranks that stopped on purpose said, each once
        print(f"birkhoff: {reason}", file=sys.stderr, flush=True)
    if reasons:
        return 2
    for text in tracebacks or ([failed.format_msg()] if failed else []):
        print(text, file=sys.stderr, flush=True)
    return 1
