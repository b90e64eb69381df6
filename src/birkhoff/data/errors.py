"""The data pipeline's error (its own module so that sources and sniff can both raise it)."""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and, where known, the line."""
