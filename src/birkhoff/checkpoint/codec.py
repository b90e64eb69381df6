"""JSON for the per-rank parts of a checkpoint (data-loader state, RNG states): plain data
only, so loading never unpickles anything. numpy arrays and tuples are tagged and restored."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

ARRAY, TUPLE = "__ndarray__", "__tuple__"


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {ARRAY: value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if ARRAY in value:
            return np.asarray(value[ARRAY], dtype=value["dtype"]).reshape(value["shape"])
        if TUPLE in value:
            return tuple(_decode(v) for v in value[TUPLE])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(_encode(value))


def loads(text: str) -> Any:
    return _decode(json.loads(text))
