"""sentencepiece tokenizer: load one, or train one from text once (cached by its settings and
the fingerprint of the text it was trained on)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from birkhoff.data.config import TokenizerConfig
from birkhoff.errors import RecipeError

NEWLINE = "\n"


class Tokenizer:
    """A loaded sentencepiece model with the ids the data pipeline needs."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model {self.path} does not exist")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id()
        self.newline_id = self._sp.piece_to_id(NEWLINE)
        self._sha256: str | None = None

    def encode_lines(self, lines: list[str]) -> list[list[int]]:
        return self._sp.encode(lines)

    def encode_document(self, text: str) -> np.ndarray:
        """One document: each line's ids followed by the newline id, then EOS (int32)."""
        ids: list[int] = []
        for line_ids in self._sp.encode(text.splitlines()):
            ids.extend(line_ids)
            ids.append(self.newline_id)
        ids.append(self.eos_id)
        return np.asarray(ids, dtype=np.int32)

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return self._sha256

    def identity(self) -> dict[str, str]:
        """What a run dir records, and what a resume or a prepared shard must match."""
        return {"path": str(self.path), "sha256": self.sha256()}


def cached_model_path(cfg: TokenizerConfig, text_fingerprint: str, cache_dir: Path) -> Path:
    """Where a tokenizer trained with these settings on this text is cached."""
    settings = {
        "text": text_fingerprint,
        "vocab_size": cfg.vocab_size,
        "model_type": cfg.model_type,
        "character_coverage": cfg.character_coverage,
        "special_ids": [cfg.unk_id, cfg.bos_id, cfg.eos_id, cfg.pad_id],
        "train_chars": cfg.train_chars,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "tokenizers" / f"{key}.model"


def train_tokenizer(cfg: TokenizerConfig, texts: Iterable[str], model_path: Path) -> Tokenizer:
    """Train on the non-empty lines of `texts` (at most `cfg.train_chars` characters) and write
    the model to `model_path` through a temporary name, so no reader sees half a file."""
    model_path.parent.mkdir(parents=True, exist_ok=True)
    lines = _training_lines(texts, cfg.train_chars)
    with tempfile.TemporaryDirectory(dir=model_path.parent) as tmp:
        prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_prefix=prefix,
                vocab_size=cfg.vocab_size,
                model_type=cfg.model_type,
                character_coverage=cfg.character_coverage,
                unk_id=cfg.unk_id,
                bos_id=cfg.bos_id,
                eos_id=cfg.eos_id,
                pad_id=cfg.pad_id,
                user_defined_symbols=[NEWLINE],
                byte_fallback=True,
                split_digits=True,
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as err:  # sentencepiece reports bad settings as RuntimeError
            reason = str(err).split("] ", 1)[-1]
            raise RecipeError(
                "data.tokenizer.vocab_size",
                cfg.vocab_size,
                f"sentencepiece cannot train it on this corpus: {reason}",
            ) from None
        os.chmod(f"{prefix}.model", 0o644)
        os.replace(f"{prefix}.model", model_path)
    return Tokenizer(model_path)


def _training_lines(texts: Iterable[str], max_chars: int) -> list[str]:
    lines: list[str] = []
    total = 0
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                lines.append(line)
                total += len(line)
        if total >= max_chars:
            break
    if not lines:
        raise RecipeError("data.sources", "", "the training split holds no text to train on")
    return lines
