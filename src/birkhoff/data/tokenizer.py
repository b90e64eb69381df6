"""The tokenizer interface the data pipeline uses, `load_tokenizer` for every kind, and the
sentencepiece kind: load a model, or train one from text once (cached by its settings and the
fingerprint of the text it was trained on). The hf kind is in hf_tokenizer.py."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sentencepiece as spm

from birkhoff.data.config import TOKENIZER_KINDS, TokenizerConfig
from birkhoff.data.hf_tokenizer import HF, HFTokenizer
from birkhoff.data.shards import sha256_file
from birkhoff.errors import RecipeError, require_choice

NEWLINE = "\n"
SENTENCEPIECE = "sentencepiece"


class Tokenizer(Protocol):
    """What the data pipeline, Engram and the run records need of a tokenizer, of any kind."""

    kind: str
    path: Path
    vocab_size: int
    eos_id: int
    pad_id: int
    newline_id: int | None

    def encode_lines(self, lines: list[str]) -> list[list[int]]: ...

    def encode_document(self, text: str) -> np.ndarray: ...

    def pieces(self) -> list[str]: ...

    def decode(self, ids: list[int]) -> str: ...

    def sha256(self) -> str: ...

    def identity(self) -> dict[str, str]: ...


def load_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer of `cfg.kind` at `cfg.path`; a null path or a missing file is a RecipeError
    (a sentencepiece model without a path is trained instead, by plan.py; hf never is)."""
    require_choice("data.tokenizer.kind", cfg.kind, TOKENIZER_KINDS)
    if cfg.path is None:
        raise RecipeError(
            "data.tokenizer.path",
            None,
            f"is required with data.tokenizer.kind={cfg.kind}: "
            + ("a tokenizer.json, or a directory holding one" if cfg.kind == HF else "a model"),
        )
    path = Path(cfg.path).expanduser()
    if cfg.kind == HF:
        if not path.exists():
            raise RecipeError(
                "data.tokenizer.path",
                cfg.path,
                "does not exist: with data.tokenizer.kind=hf it names a tokenizer.json (or a "
                "directory holding one), which is used as shipped and never trained here",
            )
        return HFTokenizer(path, cfg.eos_token, cfg.pad_token)
    if not path.is_file():
        raise RecipeError(
            "data.tokenizer.path",
            cfg.path,
            "does not exist: train one with `birkhoff data tokenizer "
            f"data.tokenizer.path={cfg.path}`, or set it to null to train on the fly",
        )
    return SentencePieceTokenizer(path)


def identity_kind(identity: Mapping[str, Any]) -> str:
    """The kind an identity records; records written before kinds existed are sentencepiece."""
    return identity.get("kind", SENTENCEPIECE)


def same_tokenizer(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two identities tokenize alike: same kind, file contents and special tokens (the
    path may differ: a model copied elsewhere is the same tokenizer)."""

    def essence(identity: Mapping[str, Any]) -> dict[str, Any]:
        kept = {key: value for key, value in identity.items() if key != "path"}
        return {**kept, "kind": identity_kind(identity)}

    return essence(a) == essence(b)


def describe_identity(identity: Mapping[str, Any]) -> str:
    return f"{identity_kind(identity)} {identity['path']} (sha256 {identity['sha256'][:12]})"


class SentencePieceTokenizer:
    """A loaded sentencepiece model with the ids the data pipeline needs."""

    kind = SENTENCEPIECE

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

    def __reduce__(self) -> tuple[type, tuple[Path]]:
        # Pickled as its path (worker processes reload it): the processor itself is not needed.
        return (SentencePieceTokenizer, (self.path,))

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
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def identity(self) -> dict[str, str]:
        """What a run dir records, and what a resume or a prepared shard must match."""
        return {"kind": self.kind, "path": str(self.path), "sha256": self.sha256()}


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
    if cfg.normalization != "nmt_nfkc":  # only then: earlier cache keys stay valid
        settings["normalization"] = cfg.normalization
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "tokenizers" / f"{key}.model"


def train_tokenizer(
    cfg: TokenizerConfig, texts: Iterable[str], model_path: Path
) -> SentencePieceTokenizer:
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
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
                **_trainer_options(cfg),
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
    return SentencePieceTokenizer(model_path)


def _trainer_options(cfg: TokenizerConfig) -> dict[str, object]:
    char = cfg.model_type == "char"
    options: dict[str, object] = {
        # A character vocabulary needs no byte pieces; vocab_size is then at most the pieces.
        "byte_fallback": not char,
        "hard_vocab_limit": not char,
        "split_digits": not char,
    }
    if cfg.normalization == "none":
        options.update(
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
        )
    return options


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
