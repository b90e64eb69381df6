"""What `birkhoff data tokenizer` and `birkhoff data prepare` do, given a validated recipe."""

from __future__ import annotations

from pathlib import Path

from birkhoff.data.config import DataConfig
from birkhoff.data.plan import (
    cache_dir,
    open_data,
    resolve_sources,
    text_fingerprint,
    training_texts,
)
from birkhoff.data.prepare import prepare_source
from birkhoff.data.shards import verify_checksums
from birkhoff.data.tokenizer import SENTENCEPIECE, cached_model_path, train_tokenizer
from birkhoff.errors import RecipeError, require


def write_tokenizer_model(cfg: DataConfig) -> Path:
    """Train a tokenizer on the training split of the recipe's raw sources; it goes to
    `data.tokenizer.path` (never over an existing file), or to the cache when that is null."""
    require(
        cfg.tokenizer.kind == SENTENCEPIECE,
        "data.tokenizer.kind",
        cfg.tokenizer.kind,
        "`birkhoff data tokenizer` trains sentencepiece models only: an hf tokenizer is the "
        "tokenizer.json you already have, named by data.tokenizer.path",
    )
    sources = resolve_sources(cfg)
    require(
        any(source.format != "prepared" for source in sources),
        "data.sources",
        [s.config.path for s in sources],
        "holds only prepared sources: list raw text, JSONL or Parquet to train a tokenizer on",
    )
    if cfg.tokenizer.path is None:
        target = cached_model_path(cfg.tokenizer, text_fingerprint(cfg, sources), cache_dir(cfg))
    else:
        target = Path(cfg.tokenizer.path).expanduser()
        if target.exists():
            raise RecipeError(
                "data.tokenizer.path", cfg.tokenizer.path, "already exists: choose a new path"
            )
    train_tokenizer(cfg.tokenizer, training_texts(cfg, sources), target)
    return target


def prepare_sources(cfg: DataConfig, show: bool) -> list[Path]:
    """Prepare every raw source of the recipe under data.prepare.output_dir, one directory per
    source, and print the `data.sources` override that trains from them."""
    require(
        cfg.prepare.output_dir is not None,
        "data.prepare.output_dir",
        None,
        "is required: the directory that receives the prepared shards",
    )
    plan = open_data(cfg)
    root = Path(cfg.prepare.output_dir).expanduser()
    outputs = []
    for index, source in enumerate(plan.sources):
        if source.format == "prepared":
            outputs.append(Path(source.files[0]))
            continue
        output = root / f"{index:02d}-{source.name}"
        manifest = prepare_source(source, plan.tokenizer, cfg, output, show)
        verify_checksums(output)
        totals = manifest["totals"]
        print(
            f"birkhoff: {source.config.path} -> {output}: {totals['train_tokens']:,} training "
            f"and {totals['heldout_tokens']:,} held-out tokens in {len(source.files)} shard(s), "
            f"{totals['skipped']} bad record(s) skipped",
            flush=True,
        )
        outputs.append(output)
    listed = ",".join(
        f"{{path:{out},weight:{s.config.weight}}}"
        for out, s in zip(outputs, plan.sources, strict=True)
    )
    print(f"birkhoff: train from them with: birkhoff train 'data.sources=[{listed}]'", flush=True)
    return outputs
