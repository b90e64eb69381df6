"""What operators meet: a signal to the whole process group, two runs in one run dir, a run
that diverges, a full disk, and refusals that must be one line and exit code 2."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from test_checkpoint import STEPS, losses, read_lines, start_cli, steps_of, wait_for
from test_train import cli_command, read_metrics, run_cli, train_in_process
from torch.distributed.checkpoint.filesystem import FileSystem

from birkhoff.checkpoint import space
from birkhoff.checkpoint.space import SaveFailed
from birkhoff.errors import RecipeError
from birkhoff.train.failures import TrainingError
from birkhoff.train.run_lock import LOCK_FILE, RunDirLock
from birkhoff.train.trainer import Trainer


def test_sigterm_to_the_process_group_checkpoints_and_resumes_exactly(tmp_path):
    """What SLURM's scancel, systemd and `timeout` do: SIGTERM to every process of a
    one-process run, the streaming loader's worker and DCP's checkpoint process
    (checkpoint.async_mode=process, spawned by the rank: the signal to the group used to kill
    it, failing the stop's save) included. The run finishes its step, checkpoints, exits
    128 + 15; a resume continues the loss curve of a run that never stopped, bit for bit.
    (Two ranks: test_checkpoint.py's kill -9 and SIGTERM test.)"""
    steps = 16
    common = [f"train.steps={steps}", "train.eval_every=0", "optim.warmup_steps=1"]
    assert "data.num_workers=0" not in common  # the worker must be there to be signalled
    run_cli([*common, "checkpoint.at_end=false", f"hydra.run.dir={tmp_path}/whole"], tmp_path)
    run = tmp_path / "run"
    background = ["checkpoint.async_mode=process", "checkpoint.every=2"]
    process = start_cli([*common, *background, f"hydra.run.dir={run}"], tmp_path)
    wait_for(lambda: steps_of(run), process, "a background checkpoint")
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    stopped = read_metrics(run)[0][-1]["step"]
    assert stopped < steps and f"SIGTERM on a rank: stopped after step {stopped}" in stdout
    assert steps_of(run)[-1] == stopped, stderr[-3000:]
    run_cli([*common, "train.resume=auto", f"hydra.run.dir={run}"], tmp_path)
    after, whole = losses(run), losses(tmp_path / "whole")
    assert [after[s] for s in range(stopped + 1, steps + 1)] == [
        whole[s] for s in range(stopped + 1, steps + 1)
    ]


def test_a_second_run_into_a_busy_run_dir_is_refused(tmp_path):
    """Two runs into one dir: the second (even one resuming, which the used-dir check lets
    through) exits 2 naming the process that holds the dir; the first is untouched."""
    run = tmp_path / "run"
    first = start_cli(["train.steps=2000", f"hydra.run.dir={run}"], tmp_path)
    wait_for(lambda: len(read_lines(run / "metrics.jsonl")) >= 1, first, "first step")
    second = subprocess.run(
        cli_command(["train.steps=5", "train.resume=auto", f"hydra.run.dir={run}"]),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.poll() is None
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = second.stderr.strip().splitlines()
    assert f"is in use by process {first.pid} on {socket.gethostname()}" in line
    assert len({r["step"] for r in read_metrics(run)[0]}) == len(read_metrics(run)[0])


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    host = socket.gethostname()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": host, "pid": int(dead)}))
    with RunDirLock(tmp_path) as lock:
        assert lock.owned and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "x"}))
    with pytest.raises(RecipeError, match="in use by process 1 on elsewhere"):
        RunDirLock(tmp_path).acquire()


def test_non_finite_steps_are_skipped_counted_and_end_the_run(tmp_path):
    """lr=1e30 explodes the weights at step 1; every later step has a non-finite loss or
    gradient norm and is skipped (no update), and after max_bad_steps in a row the run fails
    without saving. metrics.jsonl stays JSON (null for non-finite numbers)."""
    overrides = [*STEPS, "optim.lr=1e30", "train.max_bad_steps=3", "checkpoint.every=1"]
    with pytest.raises(TrainingError, match="3 in a row"):
        train_in_process(tmp_path, overrides)
    records = [json.loads(line) for line in read_lines(tmp_path / "metrics.jsonl")]
    skipped = [r for r in records if r.get("skipped")]
    assert [r["bad_steps"] for r in skipped] == [1, 2]
    assert all(r["step"] == skipped[0]["step"] for r in skipped)
    assert all(r["loss"] is None or not math.isfinite(r["loss"]) for r in skipped)
    applied = {r["step"] for r in records if "loss" in r and not r.get("skipped")}
    assert steps_of(tmp_path) == sorted(applied)  # nothing saved after the explosion


def _state(trainer) -> dict:
    """Everything a skipped step must leave alone: parameters, buffers (router biases, MoE
    loads), optimizer moments, the LR schedule's position."""
    tensors = {f"p.{k}": v.detach().clone() for k, v in trainer.model.named_parameters()}
    tensors |= {f"b.{k}": v.clone() for k, v in trainer.model.named_buffers()}
    for index, optimizer in enumerate(trainer.optimizers):
        for param, state in optimizer.state.items():
            tensors |= {f"o{index}.{id(param)}.{k}": v.clone() for k, v in state.items()}
    return {"tensors": tensors, "schedule": [s.last_epoch for s in trainer.schedulers]}


def test_a_skipped_step_changes_nothing_but_consumes_its_batch(tmp_path, monkeypatch):
    """A nan loss on the third attempt: parameters, buffers, optimizer state and schedule
    are as before it, the loader moved on, the step is not counted."""
    seen: dict = {"calls": 0}
    forward_backward = Trainer.forward_backward

    def poisoned(trainer, micro_batches):
        seen["calls"] += 1
        if seen["calls"] in (3, 4):
            seen[seen["calls"]] = (_state(trainer), trainer.loader.state_dict(), trainer.step)
        loss = forward_backward(trainer, micro_batches)
        return loss * float("nan") if seen["calls"] == 3 else loss

    monkeypatch.setattr(Trainer, "forward_backward", poisoned)
    summary = train_in_process(tmp_path, [*STEPS, "model.moe.bias_update_rate=0.01"])
    (before, loader_before, step_before), (after, loader_after, step_after) = seen[3], seen[4]
    assert step_before == step_after == 2 and summary["steps"] == 6
    assert summary["bad_steps"] == 1 and seen["calls"] == 7
    assert before["schedule"] == after["schedule"]
    assert before["tensors"].keys() == after["tensors"].keys()
    changed = [k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])]
    assert not changed
    assert loader_before != loader_after


def test_a_checkpoint_is_never_written_from_non_finite_parameters(tmp_path, monkeypatch):
    train_step = Trainer.train_step

    def corrupting(trainer):
        record = train_step(trainer)
        if trainer.step == 2:
            next(trainer.model.parameters()).data.view(-1)[0] = float("inf")
        return record

    monkeypatch.setattr(Trainer, "train_step", corrupting)
    with pytest.raises(TrainingError, match="after step 2 the parameters hold inf or nan"):
        train_in_process(tmp_path, [*STEPS, "checkpoint.every=1"])
    assert steps_of(tmp_path) == [1]


@pytest.mark.parametrize("mode", ["off", "thread"])
def test_a_full_disk_skips_a_periodic_save_and_fails_the_final_one(
    tmp_path, monkeypatch, capsys, mode
):
    """ENOSPC while DCP writes step 2's shards (and later the final step's): the partial
    directory is removed, the run says so in one line and goes on (`checkpoint_failed`, on
    the step where a background save's failure is known); the free-space check warns first;
    only the final save's failure ends the run."""
    create_stream = FileSystem.create_stream
    full_at = {"step-00000002", "step-00000006"}

    @contextlib.contextmanager
    def full_disk(self, path, mode):
        if "w" in mode and any(name in str(path) for name in full_at):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        with create_stream(self, path, mode) as stream:
            yield stream

    monkeypatch.setattr(FileSystem, "create_stream", full_disk)
    monkeypatch.setattr(space, "free_bytes", lambda root: 1000)
    with pytest.raises(SaveFailed, match="checkpoint of step 6 could not be written"):
        train_in_process(
            tmp_path,
            [
                *STEPS,
                "checkpoint.every=1",
                "checkpoint.keep_last=9",
                f"checkpoint.async_mode={mode}",
            ],
        )
    assert steps_of(tmp_path) == [1, 3, 4, 5]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    records = read_metrics(tmp_path)[0]
    failed = [r["step"] for r in records if r.get("checkpoint_failed")]
    assert failed == [2] if mode == "off" else failed in ([2], [3])
    err = capsys.readouterr().err
    assert "checkpoint of step 2 could not be written" in err and "No space left" in err
    assert "needs about" in err and "training goes on" in err
    assert "warning: checkpoint of step 1 needs about" in err


@pytest.mark.slow
def test_a_refusal_on_two_ranks_is_one_line_and_exit_2(tmp_path, shakespeare_shards):
    """Both ranks refuse a damaged checkpoint: the launcher prints the reason once (no
    traceback, no launcher noise), exits 2, and the run dir can be used again."""
    train_in_process(tmp_path / "saved", [shakespeare_shards, *STEPS[1:], "train.steps=2"])
    checkpoint = tmp_path / "saved" / "checkpoints" / "step-00000002"
    shard = next(checkpoint.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    run = tmp_path / "run"
    args = [shakespeare_shards, "launch.nproc_per_node=2", "train.micro_batch_size=4"]
    result = subprocess.run(
        cli_command([*args, f"train.resume={checkpoint}", f"hydra.run.dir={run}"]),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"birkhoff: train.resume={checkpoint}: {shard} is truncated: "
        f"{shard.stat().st_size} of {shard.stat().st_size + 10} bytes"
    ]
    # the refused run dir takes a run (one rank: the refusal left nothing behind either way)
    run_cli([shakespeare_shards, *STEPS[1:], "train.steps=2", f"hydra.run.dir={run}"], tmp_path)
