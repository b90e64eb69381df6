"""Cheap checks of a source's files before anything is launched.

Broken inputs otherwise surface late and disguised: a binary file decodes to one undecodable
document, so the tokenizer finds no text or the held-out split comes out empty. Here every raw
file's first HEAD_BYTES are read and binary data, NUL bytes, bytes that are not UTF-8 and an
overlong first line are named with the file, the place and the fix. What lies past the head is
checked record by record while streaming (sources.read_records). Local directories are walked
here too, following symlinked directories, so a symlink loop or a FIFO is named, not hung on.
"""

from __future__ import annotations

import codecs
import errno
import os
import stat
from dataclasses import dataclass

from birkhoff.data.errors import DataError

HEAD_BYTES = 64 << 10  # read from every file: enough to tell text from binary, cheap per file
# A line (a JSONL record, a text document's line) longer than this is not text to train on:
# sentencepiece ignores lines over 4 KiB when training, and it would be held in memory whole.
# 8 MiB still admits a whole book as one JSONL record.
MAX_LINE_BYTES = 8 << 20
LINE_LIMIT = f"{MAX_LINE_BYTES >> 20} MiB"
SCAN_CHUNK = 1 << 20  # an overlong first line is scanned in pieces, never held whole
# Text has almost no control bytes; random or compressed data has ~10% (27 of 256 values).
# A few stray ones in a short file are left to the NUL and UTF-8 checks, which say where.
BINARY_CONTROL_SHARE = 0.05
BINARY_MIN_CONTROLS = 16
CONTROLS = bytes([*range(0x00, 0x09), *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
NOT_CONTROLS = bytes(b for b in range(256) if b not in CONTROLS)
BYTE_ORDER_MARKS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
MAGIC = (
    (b"\x7fELF", "an ELF executable"),
    (b"MZ\x90\x00", "a Windows executable"),
    (b"\xcf\xfa\xed\xfe", "a Mach-O executable"),
    (b"\xca\xfe\xba\xbe", "a Mach-O universal binary or Java class"),
    (b"\x1f\x8b", "gzip-compressed data: decompress it"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data: decompress it"),
    (b"\xfd7zXZ\x00", "xz-compressed data: decompress it"),
    (b"PK\x03\x04", "a zip archive: extract it"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x93NUMPY", "a NumPy array"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class Finding:
    """What is wrong with a file. `message` names the file, the place and the fix. A
    `whole_file` finding means the file is not text at all (data.on_bad_record=skip drops it);
    otherwise one record is bad (and streaming skips that record)."""

    message: str
    whole_file: bool


def sniff_file(fs, path: str, url: str, fmt: str, size: int) -> Finding | None:
    """Read the head of one raw file (and, only if its first line is long, up to
    MAX_LINE_BYTES more) and say what, if anything, makes it unusable as `fmt`."""
    try:
        with fs.open(path, "rb") as file:
            head = file.read(HEAD_BYTES)
            if fmt == "parquet":
                return _parquet(file, head, url, size)
            return (
                _binary(head, url)
                or _nul(head, url)
                or _utf8(head, url, complete=len(head) >= size)
                or _first_line(file, head, url, size)
            )
    except OSError as err:
        raise DataError(f"{url}: cannot be read ({err.strerror or err})") from None


def list_local_tree(root: str) -> list[str]:
    """Every entry under the local directory `root` that is not a directory, sorted.
    Symlinked directories are followed, each real directory once: a link back into the tree
    (a loop) or a second way to the same directory is a DataError naming the link."""
    root_real = os.path.realpath(root)
    walked = {root_real: root}
    entries: list[str] = []
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                children = list(listing)
        except OSError as err:
            raise DataError(f"{directory}: cannot be listed ({err.strerror})") from None
        for entry in children:
            if not _is_dir(entry):  # a broken or looping link is checked as a file, later
                entries.append(entry.path)
                continue
            real = os.path.realpath(entry.path)
            if real in walked or root_real.startswith(real.rstrip("/") + "/"):
                raise DataError(_revisit(entry.path, real, walked.get(real)))
            walked[real] = entry.path
            pending.append(entry.path)
    return sorted(entries)


def check_regular_file(path: str, fix: str) -> None:
    """A DataError unless local `path` is (a symlink to) a regular file: reading a FIFO or a
    device would block or never end, and a broken or looping symlink has nothing to read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise DataError(
                f"{path}: broken symlink (-> {os.readlink(path)}): remove it, or point it at a file"
            ) from None
        raise DataError(f"{path}: no such file or directory (data.sources[].path)") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DataError(
                f"{path}: symlink loop (-> {os.readlink(path)}): remove the link"
            ) from None
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: {_kind(mode)}, not a regular file: {fix}")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:  # a symlink that leads to itself
        return False


def _revisit(path: str, real: str, first: str | None) -> str:
    """Why the walk refuses to enter `path` (real path `real`, walked before as `first`)."""
    if first is None:
        return f"{path}: symlink loop: it leads to {real}, which holds this source: remove the link"
    if path.startswith(first.rstrip("/") + "/"):
        return f"{path}: symlink loop: it leads back to {first}: remove the link"
    link, other = (first, path) if os.path.islink(first) else (path, first)
    return (
        f"{link}: symlink to {other}, which this source reads too: remove the link (or its "
        "files are read twice)"
    )


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def _parquet(file, head: bytes, url: str, size: int) -> Finding | None:
    """Parquet starts and ends with PAR1; the end is missing when a copy was cut short."""
    if not head.startswith(PARQUET_MAGIC):
        return Finding(
            f"{url}: not a Parquet file (no {PARQUET_MAGIC.decode()} at its start): remove it, "
            "or set the source's format to what it holds",
            whole_file=True,
        )
    file.seek(max(size - len(PARQUET_MAGIC), 0))
    if file.read(len(PARQUET_MAGIC)) != PARQUET_MAGIC or size < 2 * len(PARQUET_MAGIC):
        return Finding(
            f"{url}: Parquet file cut short (no {PARQUET_MAGIC.decode()} at its end): write "
            "it again",
            whole_file=True,
        )
    return None


def _binary(head: bytes, url: str) -> Finding | None:
    fix = "remove it from the source"
    for mark, encoding in BYTE_ORDER_MARKS:
        if head.startswith(mark):
            return Finding(
                f"{url}: {encoding} text (it starts with a byte-order mark), not UTF-8: "
                f"re-encode it (iconv -f {encoding} -t UTF-8)",
                whole_file=True,
            )
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return Finding(f"{url}: binary file ({kind}), not text: {fix}", whole_file=True)
    controls = len(head.translate(None, NOT_CONTROLS))
    if controls >= BINARY_MIN_CONTROLS and controls > BINARY_CONTROL_SHARE * len(head):
        return Finding(
            f"{url}: binary file, not text ({controls / len(head):.0%} of its first "
            f"{len(head):,} bytes are control bytes): {fix}",
            whole_file=True,
        )
    return None


def _nul(head: bytes, url: str) -> Finding | None:
    offset = head.find(b"\x00")
    if offset < 0:
        return None
    return Finding(
        f"{url}:{_line_at(head, offset)}: NUL byte at byte offset {offset}: remove the NUL "
        "bytes (tr -d '\\000')",
        whole_file=False,
    )


def _utf8(head: bytes, url: str, complete: bool) -> Finding | None:
    try:  # an incremental decoder: a character cut off at the end of the head is no error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
    except UnicodeDecodeError as err:
        return Finding(
            f"{url}:{_line_at(head, err.start)}: undecodable bytes: not UTF-8 (byte "
            f"0x{head[err.start]:02x} at byte offset {err.start}): re-encode the file as UTF-8 "
            "(iconv -f <its encoding> -t UTF-8)",
            whole_file=False,
        )
    return None


def _first_line(file, head: bytes, url: str, size: int) -> Finding | None:
    """Only a file with no newline in its head is read further, at most MAX_LINE_BYTES."""
    if size <= MAX_LINE_BYTES or b"\n" in head:
        return None
    scanned = len(head)
    while scanned <= MAX_LINE_BYTES:
        chunk = file.read(SCAN_CHUNK)
        newline = chunk.find(b"\n")
        if not chunk or 0 <= newline <= MAX_LINE_BYTES - scanned:
            return None
        scanned += len(chunk)
    return Finding(
        f"{url}:1: line 1 is longer than {LINE_LIMIT} (the limit for a line or JSONL record; "
        f"the file has {size:,} bytes): split it into lines",
        whole_file=False,
    )


def _line_at(head: bytes, offset: int) -> int:
    return head.count(b"\n", 0, offset) + 1
