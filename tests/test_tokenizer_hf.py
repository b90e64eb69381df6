"""data.tokenizer.kind=hf: a byte-level BPE tokenizer.json trained here (no download), through
streaming, prepare, Engram compression, the tokenizer refusals, validation and a short run."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from test_train import train_in_process
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from birkhoff.data import (
    DataConfig,
    DataError,
    Layout,
    SourceConfig,
    TokenizerConfig,
    TrainLoader,
    open_data,
)
from birkhoff.data.batch import BatchBuilder
from birkhoff.data.commands import prepare_sources, write_tokenizer_model
from birkhoff.data.compression import compression_table, tokenizer_compression
from birkhoff.data.documents import TRAIN, SplitSpec
from birkhoff.data.shards import PreparedSplit
from birkhoff.data.stream import WindowPacker
from birkhoff.data.tokenizer import load_tokenizer
from birkhoff.errors import RecipeError
from birkhoff.launch.recipe import load_recipe
from conftest import compose_recipe

BOS, EOS, PAD = "<|begin_of_sentence|>", "<|end_of_sentence|>", "<pad>"
# Repeated in the tokenizer's training text so that case, NFKC and accent variants become
# single tokens of the vocabulary.
VARIANTS = "The the THE\nthe The THE \ufb01 fi \uff21 a caf\u00e9 cafe\n"
SAME_CANONICAL = [
    [" the", " The", " THE", "the", "The"],
    [" \ufb01", " fi"],  # the ligature's NFKC form is "fi"
    [" \uff21", " a"],  # fullwidth A
    [" caf\u00e9", " cafe"],
]
ROUND_TRIP = (
    "Ünïcödé \ufb01 tabs\tand\r\nCRLF\n\n  spaces, 数字 123 🙂\nand <|end_of_sentence|> as text"
)
# The sentencepiece compression table of the corpus tokenizer below, from before the hf kind.
SENTENCEPIECE_TABLE_SHA256 = "4034230849e158396e577449dbc1a8017dfb26c4588df344f24f6f69ce688eaf"


def train_byte_level_bpe(texts: list[str], directory: Path) -> Path:
    """A byte-level BPE as DeepSeek ships one: tokenizer.json + tokenizer_config.json."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": {"content": PAD, "special": True}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def documents(root: Path) -> list[list[str]]:
    """The corpus' texts, per file in name order."""
    return [
        [json.loads(line)["text"] for line in path.read_text().splitlines()]
        for path in sorted(root.glob("*.jsonl"))
    ]


@pytest.fixture(scope="module")
def hf_dir(corpus, tmp_path_factory) -> Path:
    texts = [text for file in documents(corpus) for text in file] + [VARIANTS] * 500
    return train_byte_level_bpe(texts, tmp_path_factory.mktemp("hf-tokenizer"))


@pytest.fixture(scope="module")
def reference(hf_dir) -> tokenizers.Tokenizer:
    """The tokenizers library's own view of the file, to compare against."""
    return tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))


def hf_config(corpus: Path | str, hf_path: Path | str, **changes) -> DataConfig:
    sources = changes.pop("sources", [SourceConfig(path=str(corpus))])
    tokenizer = TokenizerConfig(kind="hf", path=str(hf_path))
    changes.setdefault("seq_len", 32)
    return DataConfig(sources=sources, tokenizer=tokenizer, **changes)


def sentencepiece_config(source: Path, **changes) -> DataConfig:
    tokenizer = TokenizerConfig(vocab_size=400, train_chars=200_000)
    changes.setdefault("seq_len", 32)
    return DataConfig(sources=[SourceConfig(path=str(source))], tokenizer=tokenizer, **changes)


def make_loader(cfg: DataConfig) -> TrainLoader:
    plan = open_data(cfg)
    return TrainLoader(plan, Layout(8, 8, 0, 1, 5), BatchBuilder(plan.tokenizer.eos_id, False))


def loader_state(cfg: DataConfig) -> dict:
    loader = make_loader(cfg)
    loader.next_batch()
    state = loader.state_dict()
    loader.close()
    return state


# ---- the tokenizer itself ----------------------------------------------------------------------


def test_documents_encode_as_the_library_does_end_with_eos_and_decode_losslessly(hf_dir, reference):
    tokenizer = load_tokenizer(TokenizerConfig(kind="hf", path=str(hf_dir)))  # the directory
    assert tokenizer.path == hf_dir / "tokenizer.json"
    eos, pad = reference.token_to_id(EOS), reference.token_to_id(PAD)
    assert (tokenizer.eos_id, tokenizer.pad_id) == (eos, pad) and eos != pad
    assert tokenizer.vocab_size == reference.get_vocab_size() == 400
    plain = "First line\nsecond line\n\n  last, with\ttabs\r\nand CRLF 🙂"
    expected = [*reference.encode(plain).ids, eos]
    assert tokenizer.encode_document(plain).tolist() == expected
    assert tokenizer.decode(expected) == plain
    # A special token's string inside a document is text: only the appended EOS is EOS.
    ids = tokenizer.encode_document(ROUND_TRIP)
    assert ids.dtype == np.int32 and ids[-1] == eos and np.count_nonzero(ids == eos) == 1
    assert tokenizer.decode(ids.tolist()) == ROUND_TRIP
    assert tokenizer.encode_lines(["a b", "c"]) == [reference.encode(t).ids for t in ("a b", "c")]
    assert tokenizer.newline_id == reference.token_to_id("\u010a")  # byte-level "\n"
    assert tokenizer.pieces()[reference.token_to_id("\u0120the")] == "\u0120the"
    again = pickle.loads(pickle.dumps(tokenizer))  # how loader and prepare workers get it
    assert again.identity() == tokenizer.identity()
    assert again.encode_document(plain).tolist() == expected


# ---- streaming and prepare ---------------------------------------------------------------------


def test_streaming_and_prepared_paths_give_the_libraries_token_stream(
    corpus, hf_dir, reference, tmp_path
):
    """Streaming (in a loader worker process) and prepared shards hold the same training stream,
    and it is the library's encoding of every training document followed by EOS."""
    eos = reference.token_to_id(EOS)
    expected = [
        token
        for f, texts in enumerate(documents(corpus))
        for j, text in enumerate(texts)
        if (f + j) % 20 != 19  # heldout_period 20, split_seed 0: every 20th is held out
        for token in [*reference.encode(text).ids, eos]
    ]
    cfg = hf_config(corpus, hf_dir / "tokenizer.json", shuffle=False)
    plan = open_data(cfg)
    spec = SplitSpec(TRAIN, cfg.heldout_period, cfg.split_seed, 0, 0, shuffle=False)
    packer = WindowPacker(plan.sources[0], spec, cfg.seq_len, plan.tokenizer, False, 1, epochs=1)
    windows = []
    while (window := packer.next_window()) is not None:
        windows.append(window)
    streamed = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])
    assert len(streamed) > len(expected) - cfg.seq_len - 1  # all but the last partial window
    np.testing.assert_array_equal(streamed, expected[: len(streamed)])

    cfg.prepare.output_dir = str(tmp_path)
    (prepared,) = prepare_sources(cfg, show=False)
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["tokenizer"] == plan.tokenizer.identity()
    assert manifest["tokenizer"]["kind"] == "hf"
    shards = PreparedSplit(prepared, TRAIN, cfg.seq_len)
    np.testing.assert_array_equal(np.concatenate(shards.parts), expected)
    from_shards = open_data(hf_config(prepared, hf_dir, shuffle=False))  # same tokenizer: fine
    assert from_shards.tokenizer.identity() == plan.tokenizer.identity()


# ---- Engram compression ------------------------------------------------------------------------


SENTINEL = "\U0010fffd"  # a lone space survives Strip as this (no token decodes to it)


def engram_reference_table(tokenizer: tokenizers.Tokenizer) -> list[int]:
    """Engram's compression as its authors write it, with the tokenizers library's normalizers:
    each id decoded alone; an id that decodes to a partial character keeps its raw piece."""
    normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            # whitespace as Python's \s, the project's choice (the paper's is [ \t\r\n])
            normalizers.Replace(Regex(r"[\s\x1c-\x1f]+"), " "),
            normalizers.Replace(Regex(r"^ $"), SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(SENTINEL, " "),
        ]
    )
    keys: dict[object, int] = {}
    table = []
    for i in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([i], skip_special_tokens=False)
        if "\ufffd" in text:
            key: object = ("piece", tokenizer.id_to_token(i))
        else:
            key = normalizer.normalize_str(text) or text
        table.append(keys.setdefault(key, len(keys)))
    return table


def test_hf_compression_merges_decoded_text_that_differs_only_by_case_nfkc_or_accents(
    hf_dir, reference
):
    tokenizer = load_tokenizer(TokenizerConfig(kind="hf", path=str(hf_dir)))
    table = tokenizer_compression(tokenizer)
    assert table.tolist() == engram_reference_table(reference)

    def only_id(text: str) -> int:
        (token,) = reference.encode(text).ids  # the training text made each one token
        return token

    for group in SAME_CANONICAL:
        ids = [only_id(text) for text in group]
        assert len({int(table[i]) for i in ids}) == 1, group
    groups = [int(table[only_id(group[0])]) for group in SAME_CANONICAL]
    assert len(set(groups)) == len(groups)
    # A lone byte of a multi-byte character ('ï' stands for byte 0xEF) is no text: it merges
    # with nothing, where its raw piece would have become "i".
    lone_byte = reference.token_to_id("\u00ef")
    assert (table == table[lone_byte]).sum() == 1
    specials = [int(table[reference.token_to_id(t)]) for t in (BOS, EOS, PAD)]
    assert len(set(specials)) == 3 and all((table == s).sum() == 1 for s in specials)
    # The raw byte-level pieces would not do: 'Ġthe' -> "gthe", the ligature -> "i¬g".
    raw = compression_table(tokenizer.pieces())
    assert raw[only_id(" the")] != raw[only_id("the")]


def test_sentencepiece_compression_is_unchanged(corpus):
    # Computed with compression_table before the hf kind existed.
    pieces = ["<unk>", "<s>", "</s>", "<pad>", "\n", "<0x0A>", "\u2581the", "\u2581The", "the"]
    pieces += ["THE", "\ufb01", "fi", "\u2581", "\u2581\u2581", " ", "\t", "\u00e9", "e\u0301"]
    pieces += ["\uff21", "a", "", "\u0301", "\u0120the", "\u0120The", "\u2581\u2581x\u2581"]
    expected = [0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 7, 7, 4, 4, 4, 4, 8, 8, 9, 9, 10, 10, 11, 11, 12]
    assert compression_table(pieces).tolist() == expected
    tokenizer = open_data(sentencepiece_config(corpus)).tokenizer
    table = tokenizer_compression(tokenizer)
    assert hashlib.sha256(table.numpy().tobytes()).hexdigest() == SENTENCEPIECE_TABLE_SHA256


# ---- refusals ----------------------------------------------------------------------------------


def test_a_run_or_shards_made_with_sentencepiece_refuse_the_hf_tokenizer(corpus, hf_dir, tmp_path):
    sentencepiece = sentencepiece_config(corpus)
    state = loader_state(sentencepiece)
    hf = hf_config(corpus, hf_dir)
    with pytest.raises(
        DataError, match=r"used tokenizer sentencepiece .* this one has hf .*data\.tokenizer\.kind"
    ):
        make_loader(hf).load_state_dict(state)

    sentencepiece.prepare.output_dir = str(tmp_path / "sentencepiece")
    (prepared,) = prepare_sources(sentencepiece, show=False)
    with pytest.raises(
        DataError,
        match=r"prepared with tokenizer sentencepiece .* this run uses hf .*data\.tokenizer\.kind",
    ):
        open_data(hf_config(prepared, hf_dir))

    # Shards made with hf, read with no tokenizer path (sentencepiece): refused, kind named.
    hf.prepare.output_dir = str(tmp_path / "hf")
    (hf_prepared,) = prepare_sources(hf, show=False)
    with pytest.raises(RecipeError) as info:
        open_data(sentencepiece_config(hf_prepared))
    assert str(info.value).startswith("recipe key 'data.tokenizer.kind' = 'sentencepiece': ")
    assert str(info.value).endswith(
        f"set data.tokenizer.kind=hf data.tokenizer.path={hf_dir / 'tokenizer.json'}"
    )


def test_a_resume_with_other_hf_special_tokens_refuses(corpus, hf_dir, tmp_path):
    bare = tmp_path / "tokenizer.json"  # no tokenizer_config.json: the recipe names them
    bare.write_bytes((hf_dir / "tokenizer.json").read_bytes())
    cfg = hf_config(corpus, bare)
    cfg.tokenizer.eos_token, cfg.tokenizer.pad_token = EOS, PAD
    state = loader_state(cfg)
    make_loader(cfg).load_state_dict(state)  # the same: fine
    cfg.tokenizer.pad_token = BOS
    with pytest.raises(DataError, match=r"resume with the same data\.tokenizer\.kind"):
        make_loader(cfg).load_state_dict(state)


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.tokenizer.kind=bogus"],
            "recipe key 'data.tokenizer.kind' = 'bogus': must be one of sentencepiece, hf",
        ),
        (
            ["data.tokenizer.kind=hf"],
            "recipe key 'data.tokenizer.path' = None: is required with data.tokenizer.kind=hf: a "
            "tokenizer.json, or a directory holding one (hf tokenizers are used as shipped, not "
            "trained here)",
        ),
        (
            ["data.tokenizer.pad_token=pad"],
            "recipe key 'data.tokenizer.pad_token' = 'pad': applies to data.tokenizer.kind=hf "
            "only: a sentencepiece model has data.tokenizer.pad_id; set it to null",
        ),
    ],
)
def test_a_bad_tokenizer_kind_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(compose_recipe(overrides), env={})
    assert str(info.value) == message


def test_hf_with_a_missing_file_is_refused_and_never_trained(corpus, tmp_path):
    missing = tmp_path / "absent" / "tokenizer.json"
    cfg = hf_config(corpus, missing)
    with pytest.raises(RecipeError) as info:
        open_data(cfg)
    assert str(info.value) == (
        f"recipe key 'data.tokenizer.path' = '{missing}': does not exist: with "
        "data.tokenizer.kind=hf it names a tokenizer.json (or a directory holding one), which "
        "is used as shipped and never trained here"
    )
    with pytest.raises(RecipeError) as info:
        write_tokenizer_model(cfg)  # `birkhoff data tokenizer`
    assert str(info.value).startswith(
        "recipe key 'data.tokenizer.kind' = 'hf': `birkhoff data tokenizer` trains sentencepiece "
        "models only"
    )
    cfg.tokenizer.path = None  # unvalidated: open_data must still not train one
    with pytest.raises(RecipeError, match=r"'data\.tokenizer\.path' = None: is required with"):
        open_data(cfg)
    assert not missing.parent.exists()


def test_eos_and_pad_come_from_the_file_else_from_the_recipe(hf_dir, reference, tmp_path):
    bare = tmp_path / "tokenizer.json"
    bare.write_bytes((hf_dir / "tokenizer.json").read_bytes())
    with pytest.raises(RecipeError) as info:
        load_tokenizer(TokenizerConfig(kind="hf", path=str(bare)))
    assert str(info.value) == (
        "recipe key 'data.tokenizer.eos_token' = None: is required: no tokenizer_config.json "
        f"beside {bare} names one"
    )
    named = load_tokenizer(TokenizerConfig(kind="hf", path=str(bare), eos_token=PAD, pad_token=BOS))
    assert (named.eos_id, named.pad_id) == (reference.token_to_id(PAD), reference.token_to_id(BOS))
    with pytest.raises(RecipeError, match=r"'data\.tokenizer\.pad_token' = '<unk>': is not a"):
        load_tokenizer(TokenizerConfig(kind="hf", path=str(bare), eos_token=EOS, pad_token="<unk>"))
    with pytest.raises(RecipeError) as info:  # the file names another one
        load_tokenizer(TokenizerConfig(kind="hf", path=str(hf_dir), eos_token=PAD))
    assert str(info.value) == (
        f"recipe key 'data.tokenizer.eos_token' = '{PAD}': {hf_dir / 'tokenizer_config.json'} "
        f"names eos_token '{EOS}': set it to null"
    )
    agreeing = TokenizerConfig(kind="hf", path=str(hf_dir), eos_token=EOS)
    assert load_tokenizer(agreeing).eos_id == reference.token_to_id(EOS)


# ---- a run -------------------------------------------------------------------------------------


def test_a_short_run_trains_with_the_hf_tokenizer(hf_dir, tmp_path):
    summary = train_in_process(
        tmp_path,
        [
            "data.tokenizer.kind=hf",
            f"data.tokenizer.path={hf_dir}",
            "data.tokenizer.vocab_size=400",
            "model.vocab_size=416",  # 16 padding rows, as V4's embedding has past its tokenizer
            "train.steps=3",
            "train.eval_batches=1",
            "checkpoint.at_end=false",
        ],
    )  # ~6 s of CPU: model build, the shipped corpus read through the hf tokenizer, 3 steps
    identity = json.loads((tmp_path / "tokenizer.json").read_text())
    assert identity["kind"] == "hf" and identity["path"] == str(hf_dir / "tokenizer.json")
    assert summary["tokenizer"] == identity and summary["steps"] == 3
    assert np.isfinite(summary["last_loss"]) and np.isfinite(summary["heldout_loss"])
