"""Character-level sentencepiece tokenizers, with the text kept as is (normalization: none)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from birkhoff.data.config import TokenizerConfig
from birkhoff.data.tokenizer import SentencePieceTokenizer, train_tokenizer
from birkhoff.errors import RecipeError

TEXTS = ["To be,  or not to be: that is the question.\n  Whether 'tis nobler", "Hello   World\nabc"]


def by_hand(text: str) -> list[str]:
    """One piece per character (spaces as sentencepiece's '▁'), a newline piece per line, EOS."""
    pieces = []
    for line in text.splitlines():
        pieces += ["▁" if ch == " " else ch for ch in line] + ["\n"]
    return [*pieces, "</s>"]


def pieces_of(tokenizer: SentencePieceTokenizer, text: str) -> list[str]:
    table = tokenizer.pieces()
    return [table[i] for i in tokenizer.encode_document(text)]


def test_char_tokenizer_keeps_the_text_as_is(tmp_path):
    cfg = TokenizerConfig(vocab_size=200, model_type="char", normalization="none")
    tokenizer = train_tokenizer(cfg, TEXTS * 20, tmp_path / "char.model")
    text = "To  be\n or   not\nWorld"
    assert pieces_of(tokenizer, text) == by_hand(text)
    characters = {ch for t in TEXTS for line in t.splitlines() for ch in line}
    assert tokenizer.vocab_size == len(characters) + 5  # + unk, bos, eos, pad and the newline


def test_default_normalization_collapses_spaces_and_marks_each_line(tmp_path):
    cfg = TokenizerConfig(vocab_size=200, model_type="char")
    tokenizer = train_tokenizer(cfg, TEXTS * 20, tmp_path / "char.model")
    assert pieces_of(tokenizer, "To  be\n or") == ["▁", "T", "o", "▁", "b", "e", "\n",
                                                  "▁", "o", "r", "\n", "</s>"]  # fmt: skip


def test_bad_normalization_is_refused():
    with pytest.raises(RecipeError, match=r"normalization' = 'raw': must be one of nmt_nfkc, none"):
        TokenizerConfig(normalization="raw").validate("data.tokenizer")


def test_birkhoff_data_tokenizer_trains_a_char_model_on_the_shipped_plays(tmp_path):
    path = tmp_path / "shakespeare-char.model"
    result = subprocess.run(
        [sys.executable, "-m", "birkhoff.launch.cli", "data", "tokenizer",
         "data.tokenizer.model_type=char", "data.tokenizer.normalization=none",
         "data.tokenizer.vocab_size=128", f"data.tokenizer.path={path}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tokenizer = SentencePieceTokenizer(path)
    line = "Now is the winter of our discontent"
    assert pieces_of(tokenizer, line) == by_hand(line)
    assert tokenizer.vocab_size <= 128
