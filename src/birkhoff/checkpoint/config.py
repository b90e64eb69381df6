"""The `checkpoint` recipe section."""

from __future__ import annotations

from dataclasses import dataclass

from birkhoff.errors import require, require_choice

ASYNC_MODES = ("off", "thread", "process")


@dataclass
class CheckpointConfig:
    """`every`: save every N steps (0: never during training). `at_end`: save after the last
    step, and after the step during which SIGTERM or SIGINT arrived. Retention keeps the
    newest `keep_last` complete checkpoints plus every one whose step is a multiple of
    `keep_every` (0: none), and never deletes the newest complete one. `dir`: where they go
    (null: `checkpoints/` in the run dir). `async_mode`: `off` writes while the step waits;
    `thread` and `process` copy the state to host memory, then write it in a background
    thread or a separate process (no GIL contention) while training goes on."""

    every: int = 0
    at_end: bool = True
    keep_last: int = 3
    keep_every: int = 0
    dir: str | None = None
    async_mode: str = "off"

    def validate(self, prefix: str = "checkpoint") -> None:
        require_choice(f"{prefix}.async_mode", self.async_mode, ASYNC_MODES)
        for name in ("every", "keep_every"):
            value = getattr(self, name)
            require(value >= 0, f"{prefix}.{name}", value, "must be >= 0 (0 turns it off)")
        require(
            self.keep_last >= 1,
            f"{prefix}.keep_last",
            self.keep_last,
            "must be >= 1 (the newest complete checkpoint is always kept)",
        )
