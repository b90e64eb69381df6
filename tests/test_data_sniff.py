"""Bad inputs are named before training: the file, the place and the fix, as one DataError line
(binary files, NUL bytes, not UTF-8, overlong lines, symlink loops, FIFOs), and bad records
found later while streaming are named the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_train import cli_command

from birkhoff.data import DataConfig, DataError, SourceConfig, TokenizerConfig
from birkhoff.data.commands import write_tokenizer_model
from birkhoff.data.sniff import HEAD_BYTES, MAX_LINE_BYTES
from birkhoff.data.sources import read_records, resolve_source

TEXT = b"The quality of mercy is not strained.\n" * 40  # 1520 bytes of plain text
fifos = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")


def refusal(path: Path | str, skip: bool = False, **source) -> str:
    with pytest.raises(DataError) as caught:
        resolve_source(SourceConfig(str(path), **source), skip)
    message = str(caught.value)
    assert "\n" not in message
    return message


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---- what is wrong with a file's content --------------------------------------------------


def test_random_bytes_named_txt_are_a_binary_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    message = refusal(write(tmp_path / "x.txt", noise))
    assert message.startswith(f"{tmp_path}/x.txt: binary file, not text (")
    assert message.endswith("remove it from the source, or set data.on_bad_record=skip")


def test_an_executable_named_txt_is_a_binary_file(tmp_path):
    program = write(tmp_path / "x.txt", Path(sys.executable).resolve().read_bytes())
    message = refusal(program, format="jsonl")
    assert message.startswith(f"{program}: binary file (a")  # an ELF / a Mach-O executable
    assert "), not text: remove it from the source" in message


def test_nul_bytes_are_named_with_line_and_offset(tmp_path):
    text = write(tmp_path / "x.txt", TEXT + b"bad \x00 line\n" + TEXT)
    assert refusal(text) == (
        f"{text}:41: NUL byte at byte offset 1524: remove the NUL bytes (tr -d '\\000'), "
        "or set data.on_bad_record=skip"
    )


def test_bytes_that_are_not_utf8_are_named_with_line_and_offset(tmp_path):
    text = write(tmp_path / "x.txt", TEXT + "café crème\n".encode("latin-1"))
    assert refusal(text) == (
        f"{text}:41: undecodable bytes: not UTF-8 (byte 0xe9 at byte offset 1523): re-encode "
        "the file as UTF-8 (iconv -f <its encoding> -t UTF-8), or set data.on_bad_record=skip"
    )


def test_a_first_line_longer_than_the_limit_is_refused(tmp_path):
    path = write(tmp_path / "x.txt", b"w" * (MAX_LINE_BYTES + (2 << 20)) + b"\nshort\n")
    assert refusal(path) == (
        f"{path}:1: line 1 is longer than 8 MiB (the limit for a line or JSONL record; the "
        f"file has {MAX_LINE_BYTES + (2 << 20) + 7:,} bytes): split it into lines, or set "
        "data.on_bad_record=skip"
    )


def test_a_parquet_file_that_is_not_parquet_or_cut_short_is_named(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "ok.parquet")
    whole = (tmp_path / "ok.parquet").read_bytes()
    assert "not a Parquet file (no PAR1 at its start)" in refusal(
        write(tmp_path / "t.parquet", TEXT)
    )
    assert "Parquet file cut short (no PAR1 at its end)" in refusal(
        write(tmp_path / "c.parquet", whole[:-10])
    )


def test_on_bad_record_skip_drops_binary_files_and_keeps_records_for_the_stream(tmp_path):
    good = write(tmp_path / "d/a.txt", TEXT)
    binary = write(tmp_path / "d/b.txt", Path(sys.executable).resolve().read_bytes())
    nul = write(tmp_path / "d/c.txt", TEXT + b"\x00\n")
    source = resolve_source(SourceConfig(str(tmp_path / "d")), True)
    assert source.files == (str(good), str(nul)) and source.dropped_files == (str(binary),)
    (record,) = read_records(str(nul), source)
    assert record.problem == "NUL byte (line 41 of the document)"
    assert "(no file of" in refusal(binary, skip=True)


# ---- what is wrong with a source's paths --------------------------------------------------


def test_a_symlink_loop_in_a_source_directory_is_named(tmp_path):
    write(tmp_path / "d/a.txt", TEXT)
    (tmp_path / "d/loop").symlink_to(tmp_path / "d")
    assert refusal(tmp_path / "d") == (
        f"{tmp_path}/d/loop: symlink loop: it leads back to {tmp_path}/d: remove the link"
    )
    (tmp_path / "d/loop").unlink()
    (tmp_path / "d/x.txt").symlink_to("x.txt")  # a link to itself
    message = refusal(tmp_path / "d")
    assert message == f"{tmp_path}/d/x.txt: symlink loop (-> x.txt): remove the link"


def test_symlinked_directories_are_read_once(tmp_path):
    write(tmp_path / "elsewhere/b.txt", TEXT)
    write(tmp_path / "d/a.txt", TEXT)
    (tmp_path / "d/more").symlink_to(tmp_path / "elsewhere")
    source = resolve_source(SourceConfig(str(tmp_path / "d")), False)
    assert source.files == (f"{tmp_path}/d/a.txt", f"{tmp_path}/d/more/b.txt")
    (tmp_path / "d/again").symlink_to(tmp_path / "elsewhere")
    assert "which this source reads too: remove the link" in refusal(tmp_path / "d")


@fifos
def test_a_fifo_source_path_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")
    assert refusal(tmp_path / "pipe.txt") == (
        f"{tmp_path}/pipe.txt: a named pipe (FIFO), not a regular file: data.sources[].path "
        "must name a file, a directory or a glob"
    )
    write(tmp_path / "a.txt", TEXT)
    message = refusal(tmp_path / "*.txt")
    assert message.endswith(f"not a regular file: remove it from {tmp_path}/*.txt")


@fifos
def test_a_fifo_or_a_broken_link_in_a_source_directory_is_named(tmp_path):
    write(tmp_path / "d/a.txt", TEXT)
    os.mkfifo(tmp_path / "d/p.jsonl")
    assert refusal(tmp_path / "d") == (
        f"{tmp_path}/d/p.jsonl: a named pipe (FIFO), not a regular file: remove it from "
        f"{tmp_path}/d"
    )
    os.unlink(tmp_path / "d/p.jsonl")
    (tmp_path / "d/gone.txt").symlink_to(tmp_path / "nowhere.txt")
    assert refusal(tmp_path / "d") == (
        f"{tmp_path}/d/gone.txt: broken symlink (-> {tmp_path}/nowhere.txt): remove it, or "
        "point it at a file"
    )


def test_a_prepared_directory_inside_a_raw_source_is_not_read_as_text(tmp_path):
    raw = write(tmp_path / "d/a.jsonl", b'{"text": "hello"}\n')
    write(tmp_path / "d/prepared/manifest.json", b'{"format_version": 1}')
    write(tmp_path / "d/prepared/shards/00000.train.bin", bytes(range(256)) * 64)
    write(tmp_path / "d/prepared/shards/00000.done.json", b'{"file": 0}')
    assert resolve_source(SourceConfig(str(tmp_path / "d")), False).files == (str(raw),)


# ---- records found bad while streaming, past the sniffed head -----------------------------


def test_records_past_the_head_are_checked_while_streaming(tmp_path, monkeypatch):
    text = write(tmp_path / "t.txt", TEXT * (HEAD_BYTES // len(TEXT) + 1) + b"a\x00b\n")
    source = resolve_source(SourceConfig(str(text), sample_by="line"), False)  # head is fine
    *_, last = read_records(str(text), source)
    assert last.problem == "NUL byte"
    monkeypatch.setattr("birkhoff.data.sources.MAX_LINE_BYTES", 100)
    lines = write(tmp_path / "l.jsonl", b'{"text": "short"}\n{"text": "' + b"w" * 200 + b'"}\n')
    jsonl = resolve_source(SourceConfig(str(lines)), False)
    assert [r.problem for r in read_records(str(lines), jsonl)] == [
        None,
        "a record longer than 8 MiB: split the document",
    ]
    book = write(tmp_path / "book.txt", b"first line\n" + b"w" * 200 + b"\n")
    document = resolve_source(SourceConfig(str(book)), False)
    (record,) = read_records(str(book), document)
    assert record.problem == "line 2 of the document is longer than 8 MiB: split it into lines"
    pq.write_table(pa.table({"text": [b"\xff" * 100_000]}), tmp_path / "b.parquet")
    parquet = resolve_source(SourceConfig(str(tmp_path / "b.parquet")), False)
    (record,) = read_records(parquet.files[0], parquet)
    assert record.problem.startswith("column 'text' is b'") and len(record.problem) < 100


# ---- both entry points: `birkhoff data ...` and `birkhoff train` ---------------------------


def test_data_tokenizer_names_the_binary_file(tmp_path):
    program = write(tmp_path / "x.txt", Path(sys.executable).resolve().read_bytes())
    cfg = DataConfig(sources=[SourceConfig(str(program))], tokenizer=TokenizerConfig())
    with pytest.raises(DataError, match=r"x\.txt: binary file \("):
        write_tokenizer_model(cfg)


def test_train_refuses_a_binary_file_in_one_line_before_making_a_run_dir(tmp_path):
    program = write(tmp_path / "x.txt", Path(sys.executable).resolve().read_bytes())
    result = subprocess.run(
        cli_command([f"data.sources=[{{path:{program}}}]", f"hydra.run.dir={tmp_path}/run"]),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"birkhoff: {program}: binary file (a")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
