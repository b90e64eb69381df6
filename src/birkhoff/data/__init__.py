"""Sources, tokenizer, packing, prepared shards and the resumable per-rank loader."""

from birkhoff.data.batch import Batch, BatchBuilder, EngramHasher
from birkhoff.data.config import DataConfig, SourceConfig, TokenizerConfig
from birkhoff.data.loader import Layout, TrainLoader, heldout_windows
from birkhoff.data.plan import DataPlan, open_data
from birkhoff.data.sources import DataError

__all__ = [
    "Batch",
    "BatchBuilder",
    "DataConfig",
    "DataError",
    "DataPlan",
    "EngramHasher",
    "Layout",
    "SourceConfig",
    "TokenizerConfig",
    "TrainLoader",
    "heldout_windows",
    "open_data",
]
