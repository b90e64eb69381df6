"""Engram tokenizer compression: vocabulary ids -> canonical ids, merging pieces that differ only
in case, accents, compatibility forms or whitespace (NFKC, NFD, strip accents, lowercase,
collapse whitespace). Computed once per tokenizer."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Hashable

import torch

from birkhoff.data.hf_tokenizer import HFTokenizer
from birkhoff.data.tokenizer import Tokenizer

SENTENCEPIECE_SPACE = "\u2581"
REPLACEMENT_CHARACTER = "\ufffd"


def canonical_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))
    collapsed = re.sub(r"\s+", " ", text.lower()).strip()
    if collapsed:
        return collapsed
    return " " if text.isspace() else text  # all whitespace runs are one canonical piece


def canonical_piece(piece: str) -> str:
    """A sentencepiece piece's canonical form (its '▁' is a space)."""
    return canonical_text(piece.replace(SENTENCEPIECE_SPACE, " "))


def compression_table(pieces: list[str]) -> torch.Tensor:
    """Canonical id of every sentencepiece vocabulary id, numbered by first appearance:
    (vocab,) int64."""
    return _numbered([canonical_piece(p) for p in pieces])


def decoded_compression_table(decoded: list[str], pieces: list[str]) -> torch.Tensor:
    """As `compression_table`, from each id's decoded text (a byte-level piece such as 'Ġthe'
    is no text). An id that decodes to a partial UTF-8 character keeps its raw piece as its
    key, apart from every text: it stands for a byte, not a character (as Engram's own code)."""
    keys: list[Hashable] = [
        ("piece", piece) if REPLACEMENT_CHARACTER in text else canonical_text(text)
        for text, piece in zip(decoded, pieces, strict=True)
    ]
    return _numbered(keys)


def tokenizer_compression(tokenizer: Tokenizer) -> torch.Tensor:
    if isinstance(tokenizer, HFTokenizer):
        return decoded_compression_table(tokenizer.decoded_pieces(), tokenizer.pieces())
    return compression_table(tokenizer.pieces())


def _numbered(keys: list[Hashable]) -> torch.Tensor:
    canonical_ids: dict[Hashable, int] = {}
    table = [canonical_ids.setdefault(key, len(canonical_ids)) for key in keys]
    return torch.tensor(table, dtype=torch.int64)
