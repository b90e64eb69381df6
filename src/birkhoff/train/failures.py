"""Errors that end a run on purpose, with one line that says why and what to do."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, a final checkpoint that could not be written, ...)."""


class ResidualConstraintError(TrainingError):
    """The mHC residual mapping left the doubly stochastic manifold beyond tolerance."""
