"""Sources, tokenizer, packing, prepared shards, blending, and exact resume of the loader."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_engram import rows_by_hand

from birkhoff.data import (
    BatchBuilder,
    DataConfig,
    DataError,
    EngramHasher,
    Layout,
    SourceConfig,
    TokenizerConfig,
    TrainLoader,
    heldout_windows,
    open_data,
    stream,
)
from birkhoff.data.batch import document_positions
from birkhoff.data.blend import BlendSchedule
from birkhoff.data.commands import prepare_sources, write_tokenizer_model
from birkhoff.data.compression import tokenizer_compression
from birkhoff.data.permutation import permute
from birkhoff.data.shards import verify_checksums
from birkhoff.data.sources import resolve_source
from birkhoff.model import build_model
from birkhoff.model.config import EngramConfig
from birkhoff.model.engram import hash_layout
from conftest import small_model, write_jsonl


def data_config(path: Path | str, **changes) -> DataConfig:
    sources = changes.pop("sources", [SourceConfig(path=str(path))])
    tokenizer = TokenizerConfig(vocab_size=400, train_chars=200_000)
    changes.setdefault("seq_len", 32)
    return DataConfig(sources=sources, tokenizer=tokenizer, **changes)


def make_loader(cfg: DataConfig, rank: int = 0, ranks: int = 1, batch: int = 8) -> TrainLoader:
    plan = open_data(cfg)
    build = BatchBuilder(plan.tokenizer.eos_id, cfg.document_mask)
    return TrainLoader(plan, Layout(batch, batch // ranks, rank, ranks, seed=5), build)


def take(loader: TrainLoader, steps: int) -> list[np.ndarray]:
    """Per step, this rank's windows (inputs with the last target appended)."""
    out = []
    for _ in range(steps):
        (batch,) = loader.next_batch()
        out.append(torch.cat((batch.inputs, batch.targets[:, -1:]), 1).numpy())
    return out


def global_batches(cfg: DataConfig, ranks: int, steps: int) -> np.ndarray:
    """Every rank's share of `steps` global batches, stacked back into global order."""
    shares = []
    for rank in range(ranks):
        loader = make_loader(cfg, rank, ranks)
        shares.append(take(loader, steps))
        loader.close()
    return np.stack([np.concatenate([s[step] for s in shares]) for step in range(steps)])


def resumed_batches(cfg: DataConfig, ranks: int, first: int, then: int, new_ranks: int | None):
    """Global batches of `first` steps on `ranks` ranks, then `then` steps resumed from their
    states on `new_ranks` (a fresh loader, as after a restart)."""
    new_ranks = new_ranks or ranks
    states, before = [], []
    for rank in range(ranks):
        loader = make_loader(cfg, rank, ranks)
        before.append(take(loader, first))
        states.append(loader.state_dict())
        loader.close()
    after = []
    for rank in range(new_ranks):
        loader = make_loader(cfg, rank, new_ranks)
        loader.load_state_dict(states[rank if new_ranks == ranks else 0])
        after.append(take(loader, then))
        loader.close()
    head = [np.concatenate([b[s] for b in before]) for s in range(first)]
    tail = [np.concatenate([a[s] for a in after]) for s in range(then)]
    return np.stack(head + tail)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    cfg = data_config(corpus)
    cfg.prepare.output_dir = str(out)
    (output,) = prepare_sources(cfg, show=False)
    return output


# ---- exact resume and sharding ---------------------------------------------------------------


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_resume_continues_exactly(corpus, ranks, workers):
    cfg = data_config(corpus, num_workers=workers)
    straight = global_batches(data_config(corpus, num_workers=0), ranks, 9)
    np.testing.assert_array_equal(resumed_batches(cfg, ranks, 4, 5, None), straight)


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("workers", [0, 2])
def test_prepared_resume_continues_exactly(corpus, prepared, ranks, workers):
    cfg = data_config(prepared, num_workers=workers)
    straight = global_batches(data_config(prepared, num_workers=0), ranks, 9)
    np.testing.assert_array_equal(resumed_batches(cfg, ranks, 4, 5, None), straight)


def test_loader_workers_do_not_change_the_stream(corpus, monkeypatch):
    # Chunks of 16 documents: the second worker has chunks to serve in the first batches.
    monkeypatch.setattr(stream, "CHUNK_DOCS", 16)
    batches = [global_batches(data_config(corpus, num_workers=w), 1, 6) for w in (0, 1, 2)]
    np.testing.assert_array_equal(batches[0], batches[1])
    np.testing.assert_array_equal(batches[0], batches[2])


def test_ranks_read_disjoint_documents_and_every_window_is_real_text(corpus):
    shares = [take(make_loader(data_config(corpus), rank, 2), 6) for rank in range(2)]
    rows = [{tuple(row) for step in share for row in step} for share in shares]
    assert not rows[0] & rows[1]


def test_prepared_order_is_the_same_for_any_number_of_ranks(prepared):
    one, two = (global_batches(data_config(prepared), r, 5) for r in (1, 2))
    np.testing.assert_array_equal(one, two)


def test_prepared_resume_on_another_dp_degree_neither_repeats_nor_skips(prepared):
    cfg = data_config(prepared)
    straight = global_batches(cfg, 1, 8)
    np.testing.assert_array_equal(resumed_batches(cfg, 2, 3, 5, new_ranks=1), straight)
    np.testing.assert_array_equal(resumed_batches(cfg, 1, 3, 5, new_ranks=2), straight)


def test_streaming_resume_on_another_dp_degree_refuses_naming_both(corpus):
    state = make_loader(data_config(corpus), 0, 2).state_dict()
    with pytest.raises(DataError, match="with 2 data-parallel ranks and this run has 1"):
        make_loader(data_config(corpus)).load_state_dict(state)


def test_resume_with_another_tokenizer_refuses(corpus, tmp_path):
    state = make_loader(data_config(corpus)).state_dict()
    other = data_config(corpus)
    other.tokenizer.vocab_size = 420
    with pytest.raises(DataError, match=r"used tokenizer .* resume with the same"):
        make_loader(other).load_state_dict(state)


def test_a_prepared_epoch_is_a_permutation_of_every_window(prepared):
    loader = make_loader(data_config(prepared))
    windows = loader.readers[0].num_windows
    seen = np.concatenate(take(loader, windows // 8 + 1))[:windows]
    assert len({tuple(row) for row in seen}) == windows  # no window twice within an epoch


# ---- blending ---------------------------------------------------------------------------------


def test_blend_ratios_follow_the_weights_over_10k_sequences(corpus, prepared, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "more.jsonl", 200, seed=9)
    sources = [
        SourceConfig(path=str(prepared), weight=0.7),
        SourceConfig(path=str(other), weight=0.2),
        SourceConfig(path=str(corpus), weight=0.1),
    ]
    cfg = data_config(corpus, sources=sources, seq_len=8)
    loader = make_loader(cfg, batch=100)
    for _ in range(100):
        loader.next_batch()
    shares = loader.counts / loader.counts.sum()
    np.testing.assert_allclose(shares, [0.7, 0.2, 0.1], rtol=0.02)
    assert loader.counts.sum() == 10_000


def test_blend_schedule_stays_within_one_sample_of_every_share():
    counts = np.zeros(3, dtype=np.int64)
    schedule = BlendSchedule([5, 3, 2])
    for n in range(1, 2001):
        schedule.assign(counts, 1)
        assert np.all(np.abs(counts - n * schedule.weights) < 1.0)


def test_permutation_is_a_bijection_and_depends_on_the_key():
    for n in (1, 2, 7, 1000, 4097):
        image = permute(np.arange(n), n, (1, 2))
        assert sorted(image.tolist()) == list(range(n))
    assert not np.array_equal(
        permute(np.arange(100), 100, (1,)), permute(np.arange(100), 100, (2,))
    )


# ---- packing and batch features ---------------------------------------------------------------


def test_windows_tile_the_token_stream_with_one_shared_token(corpus):
    plan = open_data(data_config(corpus, shuffle=False))
    windows = take(make_loader(data_config(corpus, shuffle=False)), 3)
    stream = np.concatenate(windows)
    np.testing.assert_array_equal(stream[1:, 0], stream[:-1, -1])
    first_doc = plan.tokenizer.encode_document(
        json.loads(corpus.joinpath("part-0.jsonl").read_text().splitlines()[0])["text"]
    )
    flat = np.concatenate([stream[0]] + [row[1:] for row in stream[1:]])
    np.testing.assert_array_equal(flat[: len(first_doc)], first_doc)
    assert flat[len(first_doc) - 1] == plan.tokenizer.eos_id


def test_document_positions(corpus):
    eos = 2
    inputs = np.array([[5, 6, eos, 7, 8, eos, 9, 9], [4, 4, 4, eos, 1, 1, 1, 1]])
    positions = document_positions(inputs, eos)
    np.testing.assert_array_equal(positions, [[0, 1, 2, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3]])
    build = BatchBuilder(eos, document_mask=True)
    batch = build(np.concatenate((inputs, np.zeros((2, 1), dtype=np.int64)), 1))
    np.testing.assert_array_equal(batch.positions.numpy(), positions)
    halves = batch.split(1)
    np.testing.assert_array_equal(halves[1].positions.numpy(), positions[1:])


def test_loader_engram_rows_equal_the_papers_hash_and_the_models(corpus):
    """The rows the loader computes off the training step are Engram's hash of the compressed
    ids, checked against a per-token Python implementation, and the model gives the same
    output with them as when it hashes itself."""
    plan = open_data(data_config(corpus))
    cfg = small_model(
        vocab_size=400, max_seq_len=32, engram=EngramConfig(layers=[0, 1], table_size=50)
    )
    compression = tokenizer_compression(plan.tokenizer)
    model = build_model(cfg, "reference", compression, plan.tokenizer.pad_id)
    build = BatchBuilder(plan.tokenizer.eos_id, False, EngramHasher(model.cfg, compression, 3))
    loader = TrainLoader(plan, Layout(4, 4, 0, 1, 0), build)
    (batch,) = loader.next_batch()
    compressed = compression[batch.inputs].tolist()
    pad = int(compression[3])
    for layer, rows in batch.engram_rows.items():
        multipliers, primes, _ = hash_layout(model.cfg.engram, layer)
        by_hand = [
            rows_by_hand(row, pad, multipliers.tolist(), primes.tolist()) for row in compressed
        ]
        assert rows.tolist() == by_hand
    torch.testing.assert_close(
        model(batch.inputs, engram_rows=batch.engram_rows), model(batch.inputs)
    )


# ---- tokenizer and prepare ---------------------------------------------------------------------


def test_tokenizer_is_trained_once_from_the_sources_and_cached(corpus, shared_cache):
    first = open_data(data_config(corpus)).tokenizer
    mtime = first.path.stat().st_mtime_ns
    again = open_data(data_config(corpus)).tokenizer
    assert again.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert first.path.is_relative_to(shared_cache) and first.vocab_size == 400
    assert (first.eos_id, first.pad_id) == (2, 3)


def test_prepare_writes_checksummed_shards_and_resumes_after_interruption(
    corpus, prepared, tmp_path
):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["totals"]["train_documents"] + manifest["totals"]["heldout_documents"] == 360
    assert verify_checksums(prepared) == 12
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    # An interrupted run: one unit unfinished (no marker, no manifest yet).
    (copy / "manifest.json").unlink()
    (copy / "shards/00001.done.json").unlink()
    (copy / "shards/00001.train.bin").write_bytes(b"partial")
    cfg = data_config(corpus)
    cfg.prepare.output_dir = str(tmp_path)
    with pytest.raises(DataError, match="did not finish"):
        make_loader(data_config(copy))
    resumed = tmp_path / f"00-{corpus.name}"
    shutil.move(copy, resumed)
    done_before = (resumed / "shards/00000.done.json").stat().st_mtime_ns
    prepare_sources(cfg, show=False)
    assert (resumed / "shards/00000.done.json").stat().st_mtime_ns == done_before  # not redone
    checksums = (resumed / "checksums.sha256").read_text()
    assert checksums == (prepared / "checksums.sha256").read_text()
    (resumed / "shards/00002.heldout.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match=r"00002\.heldout\.bin: checksum mismatch"):
        verify_checksums(resumed)


def test_prepare_refuses_to_mix_settings_in_one_directory(corpus, prepared, tmp_path):
    shutil.copytree(prepared, tmp_path / f"00-{corpus.name}")
    cfg = data_config(corpus, heldout_period=7)
    cfg.prepare.output_dir = str(tmp_path)
    with pytest.raises(DataError, match=r"other settings .*heldout_period"):
        prepare_sources(cfg, show=False)


def test_prepared_data_with_another_tokenizer_is_refused(prepared, tmp_path):
    other = tmp_path / "other.jsonl"
    write_jsonl(other, 100, seed=4)
    cfg = data_config(prepared, sources=[SourceConfig(str(prepared)), SourceConfig(str(other))])
    assert (
        open_data(cfg).tokenizer.sha256()
        == json.loads((prepared / "manifest.json").read_text())["tokenizer"]["sha256"]
    )  # without a tokenizer path, the shards' own tokenizer is used
    cfg.tokenizer.vocab_size = 380
    cfg.tokenizer.path = str(tmp_path / "other.model")
    write_tokenizer_model(cfg)
    with pytest.raises(DataError, match="was prepared with tokenizer"):
        open_data(cfg)


def test_parquet_and_text_sources_read_their_records(tmp_path):
    table = pa.table({"body": ["first doc", "second doc", None]})
    pq.write_table(table, tmp_path / "rows.parquet")
    source = resolve_source(SourceConfig(str(tmp_path / "rows.parquet"), text_field="body"), False)
    from birkhoff.data.sources import read_records

    records = list(read_records(source.files[0], source))
    assert [r.text for r in records] == ["first doc", "second doc", None]
    assert "column 'body' is None" in records[2].problem
    (tmp_path / "book.txt").write_text("para one\nline two\n\npara two\n")
    book = resolve_source(SourceConfig(str(tmp_path / "book.txt"), sample_by="paragraph"), False)
    assert [r.text for r in read_records(book.files[0], book)] == [
        "para one\nline two",
        "para two\n",
    ]


# ---- bad input ----------------------------------------------------------------------------------

BAD_LINES = {
    "not JSON": (b'{"text": "broken', r"bad.jsonl:2: not JSON"),
    "no field": (b'{"body": "x"}', r"bad.jsonl:2: no field 'text'"),
    "undecodable": (b'{"text": "\xff\xfe"}', r"bad.jsonl:2: undecodable bytes"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_jsonl_record_names_file_and_line_or_is_skipped_and_counted(corpus, tmp_path, case):
    line, message = BAD_LINES[case]
    bad = tmp_path / "bad.jsonl"
    good = write_jsonl(tmp_path / "good.jsonl", 40, seed=3).read_bytes().splitlines()
    bad.write_bytes(b"\n".join([good[0], line, *good[1:]]) + b"\n")
    sources = [SourceConfig(str(corpus)), SourceConfig(str(bad))]
    with pytest.raises(DataError, match=message):
        take(make_loader(data_config(corpus, sources=sources)), 20)
    # In order (no shuffle buffer reading ahead), 20 steps stay within the first epoch.
    loader = make_loader(data_config(corpus, sources=sources, on_bad_record="skip", shuffle=False))
    take(loader, 20)
    assert loader.skipped_records == 1


def test_missing_and_empty_files_are_named(corpus, tmp_path):
    with pytest.raises(DataError, match=r"nothing.jsonl: no such file"):
        open_data(data_config(tmp_path / "nothing.jsonl"))
    shutil.copytree(corpus, tmp_path / "c")
    (tmp_path / "c/empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.jsonl: file is empty"):
        open_data(data_config(tmp_path / "c"))
    loader = make_loader(data_config(tmp_path / "c", on_bad_record="skip"))
    assert loader.skipped_records == 1


def test_undecodable_text_file_names_the_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(b"fine line\nsecond \xff line\n")
    source = resolve_source(SourceConfig(str(text)), True)  # False: refused at once (sniff.py)
    from birkhoff.data.sources import read_records

    (record,) = read_records(source.files[0], source)
    assert record.problem == "undecodable bytes: not UTF-8 (line 2 of the document)"


def test_a_held_out_split_too_small_for_evaluation_is_refused(corpus):
    plan = open_data(data_config(corpus))
    with pytest.raises(DataError, match=r"held-out split has .* evaluation needs 100000"):
        heldout_windows(plan, 100_000)


# ---- CLI ------------------------------------------------------------------------------------


def test_data_cli_trains_a_tokenizer_and_prepares_shards(corpus, tmp_path):
    model = tmp_path / "tok.model"
    common = [f"data.sources=[{{path:{corpus}}}]", "data.tokenizer.vocab_size=400"]

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "birkhoff.launch.cli", "data", *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )

    made = cli("tokenizer", *common, f"data.tokenizer.path={model}")
    assert made.returncode == 0 and model.is_file(), made.stderr
    again = cli("tokenizer", *common, f"data.tokenizer.path={model}")
    assert again.returncode == 2 and "already exists" in again.stderr
    missing = cli("prepare", *common, f"data.tokenizer.path={model}")
    assert missing.returncode == 2
    assert "data.prepare.output_dir' = None: is required" in missing.stderr
    done = cli(
        "prepare", *common, f"data.tokenizer.path={model}", f"data.prepare.output_dir={tmp_path}/p"
    )
    assert done.returncode == 0, done.stderr
    assert "train from them with: birkhoff train 'data.sources=[{path:" in done.stdout
    verified = cli("verify", str(tmp_path / "p" / f"00-{corpus.name}"))
    assert verified.returncode == 0 and "12 files match" in verified.stdout
