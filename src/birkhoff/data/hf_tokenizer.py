"""The hf tokenizer kind: a Hugging Face `tokenizer.json` used as shipped (DeepSeek-V4's is a
byte-level BPE). Its eos and pad tokens come from the `tokenizer_config.json` beside it when
that names them, else from `data.tokenizer.eos_token` / `data.tokenizer.pad_token`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from birkhoff.data.shards import sha256_file
from birkhoff.errors import RecipeError

HF = "hf"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class HFTokenizer:
    """A loaded `tokenizer.json` with the ids the data pipeline needs. `path`: the file, or a
    directory holding one; `eos_token`/`pad_token`: the recipe's, used when the file's
    tokenizer_config.json names none (it must not name another)."""

    kind = HF

    def __init__(
        self, path: str | Path, eos_token: str | None = None, pad_token: str | None = None
    ) -> None:
        given = Path(path)
        self.path = given / TOKENIZER_FILE if given.is_dir() else given
        if not self.path.is_file():
            raise RecipeError("data.tokenizer.path", str(given), f"holds no {TOKENIZER_FILE}")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers reports every bad file as a bare Exception
            raise RecipeError(
                "data.tokenizer.path",
                str(given),
                f"is not a Hugging Face {TOKENIZER_FILE}: {str(err).splitlines()[0]}",
            ) from None
        # A document's text is data: a special token's string inside it is encoded as text, so
        # it never ends a document early (EOS comes only from encode_document).
        self._tokenizer.encode_special_tokens = True
        named = _special_tokens_named_beside(self.path)
        self.eos_token = self._resolve("eos_token", named.get("eos_token"), eos_token)
        self.pad_token = self._resolve("pad_token", named.get("pad_token"), pad_token)
        self.eos_id = self._token_id("eos_token", self.eos_token)
        self.pad_id = self._token_id("pad_token", self.pad_token)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        newline = self._tokenizer.encode("\n", add_special_tokens=False).ids
        self.newline_id: int | None = newline[0] if len(newline) == 1 else None
        self._sha256: str | None = None

    def __reduce__(self) -> tuple[type, tuple[Path, str, str]]:
        # Pickled as what loads it again (worker processes reload it), not as the Rust object.
        return (HFTokenizer, (self.path, self.eos_token, self.pad_token))

    def encode_lines(self, lines: list[str]) -> list[list[int]]:
        return [self._tokenizer.encode(line, add_special_tokens=False).ids for line in lines]

    def encode_document(self, text: str) -> np.ndarray:
        """One document: the text's ids, then EOS (int32)."""
        # Byte-level BPE has no newline piece and loses no byte: encode the text as is.
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        ids.append(self.eos_id)
        return np.asarray(ids, dtype=np.int32)

    def pieces(self) -> list[str]:
        """The vocabulary as stored: byte-level strings such as 'Ġthe' for ' the'."""
        return [self._tokenizer.id_to_token(i) or "" for i in range(self.vocab_size)]

    def decoded_pieces(self) -> list[str]:
        """Each id decoded alone, special tokens included: the text a piece stands for."""
        decode = self._tokenizer.decode
        return [decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def identity(self) -> dict[str, str]:
        """What a run dir records, and what a resume or a prepared shard must match."""
        return {
            "kind": self.kind,
            "path": str(self.path),
            "sha256": self.sha256(),
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
        }

    def _resolve(self, name: str, from_file: str | None, from_recipe: str | None) -> str:
        key, beside = f"data.tokenizer.{name}", self.path.parent / TOKENIZER_CONFIG_FILE
        if from_file is not None and from_recipe not in (None, from_file):
            raise RecipeError(
                key, from_recipe, f"{beside} names {name} {from_file!r}: set it to null"
            )
        token = from_recipe if from_file is None else from_file
        if token is None:
            raise RecipeError(
                key, None, f"is required: no {TOKENIZER_CONFIG_FILE} beside {self.path} names one"
            )
        return token

    def _token_id(self, name: str, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise RecipeError(f"data.tokenizer.{name}", token, f"is not a token of {self.path}")
        return token_id


def _special_tokens_named_beside(path: Path) -> dict[str, str]:
    """eos_token and pad_token of the tokenizer_config.json next to `path`, where it names them
    (as a string, or as an added token {"content": ...})."""
    config_path = path.parent / TOKENIZER_CONFIG_FILE
    if not config_path.is_file():
        return {}
    try:
        config: Any = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecipeError("data.tokenizer.path", str(path), f"{config_path}: {err}") from None
    named = {}
    for name in ("eos_token", "pad_token"):
        value = config.get(name) if isinstance(config, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            named[name] = value
    return named
