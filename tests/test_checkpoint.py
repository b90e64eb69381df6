"""Sharded checkpoints: exact resume, atomic directories, retention, resume on another layout
and refusal of an incompatible model."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_train import cli_command, read_metrics, run_cli, train_in_process

from birkhoff.checkpoint import CheckpointError
from birkhoff.checkpoint.contents import read_tensors, tensor_metadata
from birkhoff.checkpoint.export import load_exported
from birkhoff.checkpoint.manager import COMPLETE, complete_checkpoints
from birkhoff.data import open_data
from birkhoff.launch.cli import main as cli_main
from birkhoff.launch.recipe import load_recipe
from birkhoff.model.config import ModelConfig
from birkhoff.model.moe import Router
from birkhoff.parallel import distributed
from birkhoff.train.checkpointing import check_model
from birkhoff.train.metrics import MetricLogger
from birkhoff.train.trainer import Trainer
from conftest import SMALL_OVERRIDES, compose_recipe

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


def test_a_checkpoint_without_hash_tables_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    """Checkpoints written before hash tables were saved (made here by not saving them) resume
    with the table drawn from the seed, as the run that wrote them drew it."""
    hashed = [*STEPS, "model.moe.hash_layers=1"]
    with monkeypatch.context() as patch:
        register = torch.nn.Module.register_buffer
        patch.setattr(
            Router,
            "register_buffer",
            lambda self, name, tensor, persistent=True: register(
                self, name, tensor, persistent and name != "hash_table"
            ),
        )
        train_in_process(tmp_path / "full", [*hashed, "checkpoint.every=3"])
    step3 = tmp_path / "full" / "checkpoints" / "step-00000003"
    assert not [n for n in tensor_metadata(step3) if n.endswith("hash_table")]
    capsys.readouterr()
    train_in_process(tmp_path / "resumed", [*hashed, f"train.resume={step3}"])
    assert "has no model.blocks.0.ffn.router.hash_table" in capsys.readouterr().out
    full, after = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert [after[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]


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


def test_a_model_key_newer_than_the_checkpoint_reads_as_its_default():
    current = dataclasses.asdict(ModelConfig())
    saved = copy.deepcopy(current)
    del saved["residual"]["form"]  # written before the key existed
    check_model(saved, current, Path("ckpt"))
    changed = copy.deepcopy(current)
    changed["residual"]["form"], changed["residual"]["n_streams"] = "v4", 2
    expected = r"residual.form: 'paper' in the checkpoint, 'v4' now; model.residual.n_streams: 4"
    with pytest.raises(CheckpointError, match=expected):
        check_model(saved, changed, Path("ckpt"))


@pytest.mark.slow
def test_resume_on_another_layout_continues_the_loss(tmp_path, shakespeare_shards):
    """optim=muon_v4, saved by 2 ranks with FSDP (fsdp=2); resumed by 1 process, and by 2
    ranks with expert and with pipeline parallelism: the model, Muon's momentum (of FSDP
    shards, then whole, of expert shards over ep, of a stage's matrices) and AdamW's moments
    (embeddings, head, norms, biases) are resharded by DCP, and the prepared-shard loader
    remaps to the new data-parallel degree. Tolerance 1e-4 on the continued losses: layouts
    agree to ~1e-6 on this model (test_parallel.py)."""
    common = [shakespeare_shards, *STEPS, "optim=muon_v4", "train.micro_batch_size=4"]
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


TWO_RANKS = ["launch.nproc_per_node=2", "train.micro_batch_size=4", "train.eval_every=0"]


def start_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    """`birkhoff train` in a session of its own, so the whole run can be signalled at once."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(cli_command(args), cwd=cwd, start_new_session=True, **pipes)


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 180
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, f"no {what}"
        time.sleep(0.01)


def test_sigterm_in_one_process_finishes_the_step_and_checkpoints(tmp_path, monkeypatch):
    """The signal arrives during step 2: the step finishes, a complete checkpoint is written,
    the run returns normally and says so."""
    train_step = Trainer.train_step

    def signalled_during_step_2(trainer: Trainer) -> dict:
        if trainer.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(trainer)

    monkeypatch.setattr(Trainer, "train_step", signalled_during_step_2)
    summary = train_in_process(tmp_path, [*STEPS, "checkpoint.async_mode=thread"])
    assert summary["steps"] == 2 and steps_of(tmp_path) == [2]


@pytest.mark.slow
def test_kill_9_and_sigterm_to_a_multi_rank_run_then_auto_resume_is_exact(
    tmp_path, shakespeare_shards
):
    """2 ranks save every step in DCP's checkpoint process. SIGKILL to the whole run (launcher,
    ranks, checkpoint processes) while a checkpoint is half-written: `train.resume=auto`
    ignores it and continues from the newest complete one. SIGTERM to the whole process group
    of that resumed run (what SLURM's scancel, systemd and `timeout` do: launcher, ranks,
    loader workers; DCP's checkpoint process too: test_operations.py): every rank finishes
    the same step and checkpoints, no traceback, the exit status is 128 + 15. A second resume
    runs to the end. The losses after the kill repeat those of a run that never stopped, bit
    for bit, and no half-written directory is left."""
    steps = 14
    common = [shakespeare_shards, *TWO_RANKS, f"train.steps={steps}", "optim.warmup_steps=1"]
    run_cli([*common, "checkpoint.at_end=false", f"hydra.run.dir={tmp_path}/whole"], tmp_path)
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    process = start_cli([*common, "checkpoint.every=1", "checkpoint.async_mode=process",
                         f"hydra.run.dir={run}"], tmp_path)  # fmt: skip

    def half_written() -> list[Path]:
        newest = max(steps_of(run), default=steps)
        return [p for p in root.glob("step-*.tmp") if int(p.name[5:13]) > newest]

    wait_for(lambda: len(steps_of(run)) >= 2 and half_written(), process, "checkpoints")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert half_written(), "the kill landed between two checkpoints"
    killed_at = steps_of(run)[-1]

    logged = len(read_lines(run / "metrics.jsonl"))
    process = start_cli([*common, "train.resume=auto", f"hydra.run.dir={run}"], tmp_path)
    wait_for(lambda: len(read_lines(run / "metrics.jsonl")) > logged, process, "resumed step")
    os.killpg(process.pid, signal.SIGTERM)  # as SLURM does: the launcher, ranks, workers
    stdout, stderr = process.communicate(timeout=180)
    assert f"resumed from {root / f'step-{killed_at:08d}'} at step {killed_at}" in stdout
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    stopped = [r["step"] for r in read_metrics(run)[0]][-1]
    announced = f"SIGTERM on a rank: stopped after step {stopped}" in stdout
    assert stopped < steps and announced, stderr[-5000:]
    assert "train.resume=auto" in stderr  # the launcher's closing line
    assert steps_of(run)[-1] == stopped

    run_cli([*common, "train.resume=auto", f"hydra.run.dir={run}"], tmp_path)
    after, whole = losses(run), losses(tmp_path / "whole")
    continued = range(killed_at + 1, steps + 1)
    assert [after[s] for s in continued] == [whole[s] for s in continued]
    assert not list(root.glob("*.tmp"))


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


def test_background_saves_write_what_a_synchronous_save_writes(tmp_path):
    """thread and process modes copy the state before the next step changes it: their
    checkpoints hold the same tensors and rank states as a synchronous save's, and the step
    reports how long it was blocked."""
    checkpoints = {}
    for mode in ("off", "thread", "process"):
        run = tmp_path / mode
        train_in_process(run, ["train.steps=4", "train.eval_every=0", "checkpoint.every=2",
                               f"checkpoint.async_mode={mode}"])  # fmt: skip
        assert steps_of(run) == [2, 4]
        checkpoints[mode] = run / "checkpoints"
        records = read_metrics(run)[0]
        assert all("checkpoint_blocked_s" in records[s - 1] for s in (2, 4))
        written = [r for r in _records(run) if "checkpoint_write_s" in r]
        assert len(written) == 2  # each save reports its whole duration once, when complete
    for step in ("step-00000002", "step-00000004"):
        names = sorted(tensor_metadata(checkpoints["off"] / step))
        expected = read_tensors(checkpoints["off"] / step, names)
        for mode in ("thread", "process"):
            assert sorted(tensor_metadata(checkpoints[mode] / step)) == names
            found = read_tensors(checkpoints[mode] / step, names)
            assert all(torch.equal(found[n], expected[n]) for n in names), (mode, step)
            rank_file = f"{step}/ranks/rank-00000.json"
            assert (checkpoints[mode] / rank_file).read_text() == (
                checkpoints["off"] / rank_file
            ).read_text()


def test_export_round_trip_gives_the_same_loss(tmp_path, capsys):
    """Exported safetensors load into a fresh single-process model, by the model's own names,
    and give the run's held-out loss; --dtype casts and --max-shard-gib splits with an index."""
    overrides = ["train.steps=3", "train.eval_every=0", "checkpoint.every=3"]
    summary = train_in_process(tmp_path / "run", overrides)
    step3 = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert cli_main(["ckpt", "export", str(step3), "--to", "safetensors"]) == 0
    weights, config = load_exported(step3.with_name("step-00000003-safetensors"))
    assert config["step"] == 3 and config["model"]["hidden_size"] == 64
    recipe, _ = load_recipe(compose_recipe(SMALL_OVERRIDES + overrides), env={})
    data = open_data(recipe.data)
    with distributed(torch.device("cpu"), {}) as ctx:
        fresh = Trainer(recipe, data, ctx, torch.device("cpu"), MetricLogger([]))
        fresh.model.load_state_dict(weights, strict=True)
        assert fresh.evaluate() == summary["heldout_loss"]

    small = tmp_path / "bf16"
    args = ["--out", str(small), "--dtype", "bfloat16", "--max-shard-gib", "0.001"]
    assert cli_main(["ckpt", "export", str(step3), "--to", "safetensors", *args]) == 0
    halves, _ = load_exported(small)
    assert len(list(small.glob("model-*-of-*.safetensors"))) > 1
    assert set(halves) == set(weights)
    assert all(halves[n].equal(w.to(torch.bfloat16)) for n, w in weights.items())
    capsys.readouterr()
    assert cli_main(["ckpt", "export", str(step3), "--to", "safetensors", *args]) == 2
    assert "already exists" in capsys.readouterr().err
    (step3 / "__0_0.distcp").write_bytes(b"truncated")
    assert cli_main(["ckpt", "export", str(step3), "--to", "safetensors", "--out", "x"]) == 2
    assert "__0_0.distcp is truncated" in capsys.readouterr().err


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in read_lines(run / "metrics.jsonl")]
