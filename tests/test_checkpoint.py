"""Sharded checkpoints: exact resume, atomic directories, retention, resume on another layout
and refusal of an incompatible model."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import read_metrics, run_cli, train_in_process

from birkhoff.checkpoint import CheckpointError
from birkhoff.checkpoint.manager import COMPLETE, complete_checkpoints
from birkhoff.launch.cli import main as cli_main
from conftest import SMALL_OVERRIDES

STEPS = ["train.steps=6", "train.eval_every=0", "optim.warmup_steps=1"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)[0]}


def steps_of(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in complete_checkpoints(run_dir / "checkpoints")]


def test_resume_continues_the_loss_curve_bit_for_bit(tmp_path):
    train_in_process(tmp_path / "full", [*STEPS, "checkpoint.every=3"])
    assert steps_of(tmp_path / "full") == [3, 6]
    step3 = tmp_path / "full" / "checkpoints" / "step-00000003"
    meta = json.loads((step3 / "meta.json").read_text())
    assert meta["step"] == 3 and meta["tokens_seen"] == 3 * 8 * 64
    resumed = train_in_process(tmp_path / "resumed", [*STEPS, f"train.resume={step3}"])
    full, after = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(after) == [4, 5, 6]
    assert [after[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]  # bit-identical
    assert (
        resumed["heldout_loss"]
        == json.loads((tmp_path / "full" / "summary.json").read_text())["heldout_loss"]
    )


def test_auto_resume_ignores_a_half_written_directory_and_keeps_the_newest(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, [*STEPS, "checkpoint.every=2", "checkpoint.keep_last=1"])
    assert steps_of(run) == [6]  # retention: keep_last=1 keeps only the newest
    # A crash while writing step 8 leaves a directory without the completion marker.
    half = run / "checkpoints" / "step-00000008.tmp"
    shutil.copytree(run / "checkpoints" / "step-00000006", half)
    (half / COMPLETE).unlink()
    unmarked = run / "checkpoints" / "step-00000009"
    shutil.copytree(half, unmarked)
    summary = train_in_process(run, ["train.steps=8", "train.eval_every=0", "optim.warmup_steps=1",
                                     "train.resume=auto", "checkpoint.keep_last=1"])  # fmt: skip
    assert summary["steps"] == 8
    assert [r["step"] for r in read_metrics(run)[0]][-2:] == [7, 8]  # resumed from step 6
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        train_in_process(tmp_path / "other", [*STEPS, f"train.resume={unmarked}"])


def test_retention_keeps_the_last_k_and_every_mth(tmp_path):
    train_in_process(
        tmp_path,
        [*STEPS, "checkpoint.every=1", "checkpoint.keep_last=2", "checkpoint.keep_every=4"],
    )
    assert steps_of(tmp_path) == [4, 5, 6]


def test_inspect_reports_the_checkpoint_and_another_model_is_refused(tmp_path, capsys):
    train_in_process(tmp_path / "run", [*STEPS, "checkpoint.every=3"])
    step3 = tmp_path / "run" / "checkpoints" / "step-00000003"
    capsys.readouterr()
    assert cli_main(["ckpt", "inspect", str(step3), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] and info["step"] == 3 and info["world_size"] == 1
    assert info["tensors"]["model.embedding.weight"] == {
        "shape": [4096, 64], "dtype": "float32", "bytes": 4096 * 64 * 4,
    }  # fmt: skip
    moments = [name for name in info["tensors"] if name.endswith(".exp_avg_sq")]
    assert "optim.state.embedding.weight.exp_avg_sq" in moments
    assert info["recipe"]["checkpoint"]["every"] == 3
    assert cli_main(["ckpt", "inspect", str(step3)]) == 0
    assert "step 3 | tokens seen 1536" in capsys.readouterr().out
    assert cli_main(["ckpt", "inspect", str(tmp_path / "missing")]) == 2
    with pytest.raises(CheckpointError, match=r"model.ffn_hidden_size: 128 in the checkpoint"):
        train_in_process(
            tmp_path / "other", [*STEPS, f"train.resume={step3}", "model.ffn_hidden_size=96"]
        )


@pytest.mark.slow
def test_resume_on_another_layout_continues_the_loss(tmp_path, shakespeare_shards):
    """Saved by 2 ranks with FSDP (fsdp=2); resumed by 1 process, and by 2 ranks with expert
    and with pipeline parallelism: model and AdamW state are resharded by DCP, the
    prepared-shard loader remaps to the new data-parallel degree. Tolerance 1e-4 on the
    continued losses: layouts agree to ~1e-6 on this model (test_parallel.py)."""
    common = [shakespeare_shards, *STEPS, "train.micro_batch_size=4"]
    run_cli([*common, "checkpoint.every=3", "launch.nproc_per_node=2",
             f"hydra.run.dir={tmp_path}/fsdp2"], tmp_path)  # fmt: skip
    step3 = tmp_path / "fsdp2" / "checkpoints" / "step-00000003"
    full = losses(tmp_path / "fsdp2")
    changes = {
        "one": ["launch.nproc_per_node=1"],
        "ep2": ["launch.nproc_per_node=2", "parallel.ep=2"],
        "pp2": ["launch.nproc_per_node=2", "parallel.pp=2"],
    }
    for name, layout in changes.items():
        result = run_cli(
            [*common, *layout, f"train.resume={step3}", f"hydra.run.dir={tmp_path}/{name}"],
            tmp_path,
        )
        assert "saved with" in result.stdout  # the run says what changed
        after = losses(tmp_path / name)
        assert sorted(after) == [4, 5, 6]
        assert [after[s] for s in (4, 5, 6)] == pytest.approx(
            [full[s] for s in (4, 5, 6)], abs=1e-4
        )


def test_sigterm_finishes_the_step_checkpoints_and_auto_resume_continues(tmp_path):
    """The run keeps going until SIGTERM, stops after the step it was in, writes a complete
    checkpoint, and `train.resume=auto` in the same run dir continues from there."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "birkhoff.launch.cli", "train", *SMALL_OVERRIDES,
               "train.steps=100000", "train.eval_every=0", f"hydra.run.dir={run}"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while len(read_lines(run / "metrics.jsonl")) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=180)
    assert process.returncode == 0
    stopped = [r["step"] for r in read_metrics(run)[0]][-1]
    assert f"SIGTERM on a rank: stopped after step {stopped}" in stdout
    assert steps_of(run) == [stopped]
    run_cli(["train.eval_every=0", f"train.steps={stopped + 2}", "train.resume=auto",
             f"hydra.run.dir={run}"], tmp_path)  # fmt: skip
    assert [r["step"] for r in read_metrics(run)[0]][-3:] == [stopped, stopped + 1, stopped + 2]


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_damaged_shard_is_named_and_auto_resume_falls_back(tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(run, [*STEPS, "checkpoint.every=2"])
    assert steps_of(run) == [2, 4, 6]
    newest, middle = (run / "checkpoints" / f"step-0000000{s}" for s in (6, 4))
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    flipped = next(middle.glob("*.distcp"))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name} is truncated: \d+ of \d+ bytes"):
        train_in_process(tmp_path / "other", [*STEPS, f"train.resume={newest}"])
    capsys.readouterr()
    resumed = ["train.steps=7", "train.eval_every=0", "optim.warmup_steps=1", "train.resume=auto"]
    train_in_process(run, resumed)
    out = capsys.readouterr().out
    assert f"{shard.name} is truncated" in out and f"{flipped.name} is corrupted" in out
    assert "resumed from" in out and "step-00000002 at step 2" in out
    assert [r["step"] for r in read_metrics(run)[0]][-5:] == [3, 4, 5, 6, 7]
