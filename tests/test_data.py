import numpy as np
import pytest

from birkhoff.data import BatchLoader, DataConfig, heldout_batches, prepare_data
from birkhoff.data.corpus import CorpusError, Document, load_documents
from birkhoff.data.prepare import split_documents


def test_shipped_corpus_has_the_plays():
    docs = load_documents("shakespeare")
    assert len(docs) == 38  # 37 canonical plays plus Edward III
    assert sum(len(d.text) for d in docs) > 5_000_000
    assert [d.name for d in docs] == sorted(d.name for d in docs)


def test_prepare_trains_the_tokenizer_once_and_reuses_it(shared_cache):
    first = prepare_data(DataConfig())
    model_file = first.tokenizer.path
    mtime = model_file.stat().st_mtime_ns
    second = prepare_data(DataConfig())
    assert second.tokenizer.path == model_file and model_file.stat().st_mtime_ns == mtime
    assert model_file.is_relative_to(shared_cache)
    assert first.tokenizer.vocab_size == 4096
    np.testing.assert_array_equal(first.train_tokens, second.train_tokens)
    assert first.train_tokens.max() < 4096 and first.heldout_tokens.size > 10_000
    # Text survives the round trip through the tokenizer (newlines included).
    text = first.tokenizer.decode(first.train_tokens[:200].tolist())
    assert "\n" in text and len(text) > 200


def test_split_holds_out_whole_documents_deterministically():
    docs = [Document(f"d{i}", f"text {i}") for i in range(40)]
    train, heldout = split_documents(docs, 0.05, seed=0)
    assert len(heldout) == 2 and len(train) == 38
    assert not {d.name for d in train} & {d.name for d in heldout}
    assert split_documents(docs, 0.05, seed=0) == (train, heldout)
    assert split_documents(docs, 0.05, seed=1) != (train, heldout)


def test_a_single_document_is_split_by_lines():
    doc = Document("one", "\n".join(f"line {i}" for i in range(100)))
    train, heldout = split_documents([doc], 0.1, seed=0)
    assert heldout[0].text.splitlines() == [f"line {i}" for i in range(90, 100)]
    assert train[0].text.splitlines()[-1] == "line 89"


def test_corpus_errors_name_the_file(tmp_path):
    with pytest.raises(CorpusError, match="neither 'shakespeare' nor an existing"):
        load_documents(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n")
    with pytest.raises(CorpusError, match="every file is empty"):
        load_documents(str(empty))
    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"ok\xff\xfe")
    with pytest.raises(CorpusError, match=r"bad.txt: not UTF-8"):
        load_documents(str(binary))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CorpusError, match=r"holds no \.txt/\.md files"):
        load_documents(str(tmp_path / "nothing"))


def make_loader(rank, world, tokens, micro=2, seed=7):
    return BatchLoader(
        tokens,
        seq_len=4,
        global_batch_size=8,
        micro_batch_size=micro,
        dp_rank=rank,
        dp_size=world,
        seed=seed,
    )


def test_ranks_split_one_global_batch_exactly():
    tokens = np.arange(401, dtype=np.int32)  # 100 windows of 4
    single = torch_cat(make_loader(0, 1, tokens, micro=4).next_batch())
    halves = [torch_cat(make_loader(r, 2, tokens).next_batch()) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), single)


def test_targets_are_inputs_shifted_by_one():
    tokens = np.arange(401, dtype=np.int32)
    inputs, targets = make_loader(0, 1, tokens).next_batch()[0]
    np.testing.assert_array_equal(inputs[:, 1:].numpy(), targets[:, :-1].numpy())
    assert inputs.shape == (2, 4)


def test_epochs_cover_every_window_once_and_reshuffle():
    tokens = np.arange(81, dtype=np.int32)  # 20 windows
    loader = BatchLoader(tokens, 4, 4, 4, 0, 1, seed=3)
    batches = [torch_cat(loader.next_batch()) for _ in range(10)]
    starts = [int(row[0]) for batch in batches for row in batch]
    first, second = starts[:20], starts[20:]
    assert sorted(first) == sorted(second) == list(range(0, 80, 4))
    assert first != second


def test_state_dict_resumes_the_same_stream():
    tokens = np.arange(401, dtype=np.int32)
    reference = make_loader(1, 2, tokens)
    expected = [torch_cat(reference.next_batch()) for _ in range(30)]
    loader = make_loader(1, 2, tokens)
    for _ in range(11):
        loader.next_batch()
    resumed = make_loader(1, 2, tokens)
    resumed.load_state_dict(loader.state_dict())
    for step in range(11, 30):
        np.testing.assert_array_equal(torch_cat(resumed.next_batch()), expected[step])
    with pytest.raises(ValueError, match="different data"):
        make_loader(0, 2, tokens, seed=8).load_state_dict(loader.state_dict())


def test_heldout_batches_are_fixed_and_split_across_ranks():
    tokens = np.arange(401, dtype=np.int32)
    whole = [torch_cat([b]) for b in heldout_batches(tokens, 4, 8, 3, 0, 1)]
    parts = [[torch_cat([b]) for b in heldout_batches(tokens, 4, 8, 3, r, 2)] for r in range(2)]
    assert len(whole) == 3
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate([parts[0][i], parts[1][i]]), whole[i])


def torch_cat(batches):
    return np.concatenate([inputs.numpy() for inputs, _ in batches])
