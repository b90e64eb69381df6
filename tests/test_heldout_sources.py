"""data.heldout_sources: evaluation data named by the user, read whole; training sources whole."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_data import data_config, make_loader, take

from birkhoff.data import DataError, SourceConfig, heldout_windows, open_data
from conftest import write_jsonl


def documents(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """Documents as the loader should read them: each encoded with its EOS, one after another."""
    return np.concatenate([tokenizer.encode_document(text) for text in texts])


@pytest.fixture(scope="module")
def split_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    train = write_jsonl(root / "train.jsonl", 40, seed=11)
    heldout = write_jsonl(root / "heldout.jsonl", 30, seed=12)
    return train, heldout


def test_heldout_windows_are_the_named_source_read_whole_in_order(split_corpus):
    train, heldout = split_corpus
    cfg = data_config(train, heldout_sources=[SourceConfig(path=str(heldout))], shuffle=False)
    plan = open_data(cfg)
    windows = heldout_windows(plan, 6)
    flat = token_stream(plan.tokenizer, documents(heldout))
    t = cfg.seq_len
    expected = np.stack([flat[k * t : k * t + t + 1] for k in range(6)])
    np.testing.assert_array_equal(windows, expected)


def test_training_sources_are_read_whole_with_named_heldout_sources(split_corpus):
    """Record 19 of the file is what heldout_period=20 would hold out; here it is trained on."""
    train, heldout = split_corpus
    cfg = data_config(train, heldout_sources=[SourceConfig(path=str(heldout))], shuffle=False)
    plan = open_data(cfg)
    texts = documents(train)
    stream = np.concatenate(take(make_loader(cfg), 60))
    flat = np.concatenate([stream[0]] + [row[1:] for row in stream[1:]])
    expected = token_stream(plan.tokenizer, texts[:21])
    np.testing.assert_array_equal(flat[: len(expected)], expected)
    # Without heldout_sources the position rule skips record 19.
    default = data_config(train, shuffle=False)
    plan = open_data(default)
    stream = np.concatenate(take(make_loader(default), 60))
    flat = np.concatenate([stream[0]] + [row[1:] for row in stream[1:]])
    skipping = token_stream(plan.tokenizer, texts[:19] + texts[20:21])
    np.testing.assert_array_equal(flat[: len(skipping)], skipping)


def test_a_file_both_trained_on_and_held_out_is_refused(split_corpus):
    train, _ = split_corpus
    cfg = data_config(train, heldout_sources=[SourceConfig(path=str(train.parent))])
    with pytest.raises(DataError, match=r"data.heldout_sources.0: .*train.jsonl is also in "
                       r"data.sources.0: held-out data must not be trained on"):  # fmt: skip
        open_data(cfg)


def test_a_heldout_source_too_small_for_evaluation_is_refused(split_corpus, tmp_path):
    train, _ = split_corpus
    small = write_jsonl(tmp_path / "small.jsonl", 2, seed=3)
    plan = open_data(data_config(train, heldout_sources=[SourceConfig(path=str(small))]))
    with pytest.raises(DataError, match=r"data.heldout_sources.0 .*evaluation needs 500"):
        heldout_windows(plan, 500)


def test_a_prepared_heldout_source_is_read_whole(split_corpus, tmp_path):
    """The held-out file prepared (with the run's tokenizer, every 5th record of it in the
    shards' held-out split): its windows are those of its training split's documents, then
    of its held-out split's, each encoded with its EOS, one after another (the split rule
    written out: record i is held out when (i + split_seed) % 5 == 4)."""
    from birkhoff.data.commands import prepare_sources

    train, heldout = split_corpus
    # the run's tokenizer (trained on the training file read whole, as with named sources)
    raw = SourceConfig(path=str(heldout))
    run = open_data(data_config(train, heldout_sources=[raw], shuffle=False))
    prepare = data_config(heldout, heldout_period=5)
    prepare.tokenizer.path = str(run.tokenizer.path)
    prepare.prepare.output_dir = str(tmp_path / "prepared")
    (prepared,) = prepare_sources(prepare, show=False)
    source = SourceConfig(path=str(prepared), format="prepared")
    cfg = data_config(train, heldout_sources=[source], shuffle=False)
    plan = open_data(cfg)
    t, texts = cfg.seq_len, documents(heldout)
    parts = []
    for held_out in (False, True):
        mine = [d for i, d in enumerate(texts) if ((i + cfg.split_seed) % 5 == 4) == held_out]
        flat = token_stream(plan.tokenizer, mine)
        parts += [flat[k * t : k * t + t + 1] for k in range((len(flat) - 1) // t)]
    assert len(parts) > 8
    np.testing.assert_array_equal(heldout_windows(plan, len(parts)), np.stack(parts))


def test_a_prepared_heldout_source_of_another_tokenizer_is_refused(split_corpus, tmp_path):
    from birkhoff.data.commands import prepare_sources

    train, heldout = split_corpus
    prepare = data_config(heldout, heldout_period=5)
    prepare.prepare.output_dir = str(tmp_path / "prepared")
    (prepared,) = prepare_sources(prepare, show=False)  # its own tokenizer, trained on it
    source = SourceConfig(path=str(prepared), format="prepared")
    with pytest.raises(DataError, match=r"data.heldout_sources.0: .* was prepared with tokenizer"):
        open_data(data_config(train, heldout_sources=[source]))


def test_a_heldout_source_prepared_from_a_training_file_is_refused(split_corpus, tmp_path):
    """The overlap check sees through preparation: the training file prepared is the same
    data, held out or trained on."""
    from birkhoff.data.commands import prepare_sources

    train, _ = split_corpus
    prepare = data_config(train)
    prepare.prepare.output_dir = str(tmp_path / "prepared")
    (prepared,) = prepare_sources(prepare, show=False)
    source = SourceConfig(path=str(prepared), format="prepared")
    with pytest.raises(DataError, match=r"data.heldout_sources.0: .*train.jsonl is also in"):
        open_data(data_config(train, heldout_sources=[source]))
