"""Text corpora, the sentencepiece tokenizer, token streams and the sharded batch loader."""

from birkhoff.data.config import DataConfig, TokenizerConfig
from birkhoff.data.loader import BatchLoader, heldout_batches
from birkhoff.data.prepare import PreparedData, prepare_data

__all__ = [
    "BatchLoader",
    "DataConfig",
    "PreparedData",
    "TokenizerConfig",
    "heldout_batches",
    "prepare_data",
]
