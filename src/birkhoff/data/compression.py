"""Engram tokenizer compression: vocabulary ids -> canonical ids, merging pieces that differ only
in case, accents, compatibility forms or whitespace (NFKC, NFD, strip accents, lowercase,
collapse whitespace). Computed once per tokenizer."""

from __future__ import annotations

import re
import unicodedata

import torch

from birkhoff.data.tokenizer import Tokenizer

SENTENCEPIECE_SPACE = "\u2581"


def canonical_piece(piece: str) -> str:
    text = unicodedata.normalize("NFKC", piece.replace(SENTENCEPIECE_SPACE, " "))
    text = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))
    collapsed = re.sub(r"\s+", " ", text.lower()).strip()
    if collapsed:
        return collapsed
    return " " if text.isspace() else text  # all whitespace runs are one canonical piece


def compression_table(pieces: list[str]) -> torch.Tensor:
    """Canonical id of every vocabulary id, numbered by first appearance: (vocab,) int64."""
    canonical_ids: dict[str, int] = {}
    table = [canonical_ids.setdefault(canonical_piece(p), len(canonical_ids)) for p in pieces]
    return torch.tensor(table, dtype=torch.int64)


def tokenizer_compression(tokenizer: Tokenizer) -> torch.Tensor:
    return compression_table(tokenizer.pieces())
