"""Checkpoints received from others: a crafted DCP `.metadata` never runs code (inspect,
export, resume), and every file, meta.json included, is covered by checksums.json."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import read_metrics, train_in_process
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from birkhoff.checkpoint import CheckpointConfig, CheckpointError, CheckpointManager
from birkhoff.checkpoint.contents import read_tensors, tensor_metadata
from birkhoff.checkpoint.integrity import CHECKSUMS, digest
from birkhoff.checkpoint.manager import COMPLETE
from birkhoff.checkpoint.safe_metadata import load_metadata
from birkhoff.launch.cli import main as cli_main

STEPS = ["train.eval_every=0", "optim.warmup_steps=1"]
REFUSED = (
    r"\.metadata: refuses to load {} \(only checkpoint metadata classes are allowed\); "
    r"this checkpoint is not safe to open"
)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with checkpoints at steps 2 and 4, completed by the background writer (the
    synchronous path is exercised by test_checkpoint.py). Tests change copies of it."""
    run = tmp_path_factory.mktemp("saved") / "run"
    overrides = ["train.steps=4", "checkpoint.every=2", "checkpoint.async_mode=thread"]
    train_in_process(run, [*STEPS, *overrides])
    return run


@pytest.fixture
def run(saved_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(saved_run, copy)
    return copy


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


class Payload:
    """Unpickling it calls `call` (a function and its arguments)."""

    def __init__(self, call: tuple) -> None:
        self.call = call

    def __reduce__(self) -> tuple:
        return self.call


def plant(path: Path, obj: object) -> None:
    """Replace the checkpoint's .metadata by a pickle of `obj` and list it in checksums.json,
    as a sender would: only the unpickler stands in the way."""
    (path / ".metadata").write_bytes(pickle.dumps(obj))
    sums = json.loads((path / CHECKSUMS).read_text())
    sums[".metadata"] = digest(path / ".metadata")
    (path / CHECKSUMS).write_text(json.dumps(sums))


def birkhoff(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "birkhoff.launch.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_a_crafted_metadata_runs_nothing_in_inspect_or_export(run, tmp_path):
    marker = tmp_path / "marker"
    path = checkpoint(run, 4)
    plant(path, Payload((os.system, (f"touch {marker}",))))
    for args in (["inspect", str(path)], ["export", str(path), "--to", "safetensors"]):
        result = birkhoff("ckpt", *args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert str(path / ".metadata") in result.stderr
        assert re.search(REFUSED.format(r"posix\.system"), result.stderr), result.stderr
        assert not marker.exists()


def test_a_crafted_metadata_runs_nothing_on_resume(run, tmp_path):
    """The payload hides inside otherwise genuine metadata; resume verifies the checksums
    (resealed), then refuses while unpickling, before anything is called."""
    marker = tmp_path / "marker"
    path = checkpoint(run, 4)
    metadata = load_metadata(path)
    metadata.planner_data = {"x": Payload((open, (str(marker), "w")))}
    plant(path, metadata)
    with pytest.raises(CheckpointError, match=REFUSED.format(r"io\.open")) as refused:
        train_in_process(tmp_path / "other", [*STEPS, "train.steps=5", f"train.resume={path}"])
    assert "\n" not in str(refused.value) and str(path / ".metadata") in str(refused.value)
    with pytest.raises(CheckpointError, match=REFUSED.format(r"io\.open")):
        read_tensors(path, ["model.embedding.weight"])
    assert not marker.exists()


@pytest.mark.parametrize("change", ["bytes", "outside", "missing"])
def test_metadata_that_would_read_unsafely_is_refused(run, change, capsys):
    """Only allow-listed classes, yet DCP would torch.load a bytes entry with
    weights_only=False, or read a shard from outside the checkpoint; or no metadata at all."""
    path = checkpoint(run, 2)
    metadata = load_metadata(path)
    if change == "bytes":
        metadata.state_dict_metadata["model.embedding.weight"] = BytesStorageMetadata()
        expected = REFUSED.format(r"torch\.distributed\.checkpoint\.metadata\.BytesStorageMetadata")
    elif change == "outside":
        next(iter(metadata.storage_data.values())).relative_path = "../../outside.distcp"
        expected = r"a shard is read from '\.\./\.\./outside\.distcp', outside the checkpoint"
    else:
        expected = rf"{path / '.metadata'} is missing: {path} is not a checkpoint"
    if change == "missing":
        (path / ".metadata").unlink()
    else:
        (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=expected):
        tensor_metadata(path)
    capsys.readouterr()
    assert cli_main(["ckpt", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(path / ".metadata") in err


def test_an_intact_checkpoint_still_inspects_and_reads(run, capsys):
    path = checkpoint(run, 4)
    capsys.readouterr()
    assert cli_main(["ckpt", "inspect", str(path)]) == 0
    assert "step 4 | tokens seen 2048" in capsys.readouterr().out
    assert read_tensors(path, ["optim.state.head.weight.step"])["optim.state.head.weight.step"] == 4


def test_every_file_is_listed_and_an_unlisted_one_is_refused(run):
    path = checkpoint(run, 4)
    files = {str(f.relative_to(path)) for f in path.rglob("*") if f.is_file()}
    listed = set(json.loads((path / CHECKSUMS).read_text()))
    assert "meta.json" in listed and listed == files - {COMPLETE, CHECKSUMS}
    (path / "ranks" / "rank-00001.json").write_text("{}")
    manager = CheckpointManager(run / "checkpoints", CheckpointConfig(), 0, False)
    with pytest.raises(CheckpointError, match=r"rank-00001\.json is not listed in checksums"):
        manager.resolve(str(path))


def test_an_edited_meta_json_is_refused_and_auto_resume_falls_back(run, tmp_path, capsys):
    path = checkpoint(run, 4)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "step": 1000}, indent=2) + "\n")
    with pytest.raises(CheckpointError, match=rf"{path / 'meta.json'} is corrupted"):
        train_in_process(tmp_path / "other", [*STEPS, "train.steps=5", f"train.resume={path}"])
    capsys.readouterr()
    train_in_process(run, [*STEPS, "train.steps=3", "train.resume=auto"])
    out = capsys.readouterr().out
    assert "meta.json is corrupted" in out and "falling back" in out
    assert f"resumed from {checkpoint(run, 2)} at step 2" in out
    assert read_metrics(run)[0][-1]["step"] == 3


def test_a_missing_checksum_list_is_named_and_auto_resume_falls_back(run, capsys):
    path = checkpoint(run, 4)
    (path / CHECKSUMS).unlink()
    manager = CheckpointManager(run / "checkpoints", CheckpointConfig(), 0, False)
    with pytest.raises(CheckpointError, match=rf"{path / CHECKSUMS} is missing") as refused:
        manager.resolve(str(path))
    assert "\n" not in str(refused.value) and "copy the checkpoint again" in str(refused.value)
    assert manager.resolve("auto") == checkpoint(run, 2)
    assert f"{CHECKSUMS} is missing" in capsys.readouterr().out
    assert cli_main(["ckpt", "export", str(path), "--to", "safetensors"]) == 2
    assert f"{path / CHECKSUMS} is missing" in capsys.readouterr().err
