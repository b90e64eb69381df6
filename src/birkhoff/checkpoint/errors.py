"""The error of an unusable checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the path and what is wrong."""
