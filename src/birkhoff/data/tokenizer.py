"""sentencepiece tokenizer: load one, or train one on the corpus once and cache it by content."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import sentencepiece as spm

from birkhoff.data.config import TokenizerConfig
from birkhoff.data.corpus import Document
from birkhoff.errors import RecipeError

NEWLINE = "\n"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class Tokenizer:
    """A loaded sentencepiece model with the ids the data pipeline needs."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model {self.path} does not exist")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        self.newline_id = self._sp.piece_to_id(NEWLINE)

    def encode_lines(self, lines: list[str]) -> list[list[int]]:
        return self._sp.encode(lines)

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def load_or_train_tokenizer(
    cfg: TokenizerConfig, documents: list[Document], corpus_key: str, cache_dir: Path
) -> Tokenizer:
    """The configured tokenizer, or one trained on `documents` and cached under `cache_dir`."""
    if cfg.path is not None:
        return Tokenizer(Path(cfg.path).expanduser())
    settings = {
        "corpus": corpus_key,
        "vocab_size": cfg.vocab_size,
        "model_type": cfg.model_type,
        "character_coverage": cfg.character_coverage,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    model_path = cache_dir / "tokenizers" / f"{key}.model"
    if not model_path.is_file():
        _train(cfg, documents, model_path)
    return Tokenizer(model_path)


def _train(cfg: TokenizerConfig, documents: list[Document], model_path: Path) -> None:
    """Train in a temporary directory and rename, so a concurrent reader never sees half a file."""
    model_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [line for doc in documents for line in doc.text.splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(dir=model_path.parent) as tmp:
        prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_prefix=prefix,
                vocab_size=cfg.vocab_size,
                model_type=cfg.model_type,
                character_coverage=cfg.character_coverage,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_id=PAD_ID,
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
        os.replace(f"{prefix}.model", model_path)
