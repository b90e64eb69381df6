"""What Hydra itself would print or write of a `birkhoff train` job, scrubbed of secrets: a
failed job's error (Hydra prints it after the job's command line) and a sweep's
multirun.yaml (the overrides of the whole command line). Its logs go through the
`scrubbed` logging configs of recipes/hydra."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from birkhoff.atomic import write_text_atomic
from birkhoff.train.secrets import scrub_text

Job = Callable[[DictConfig], None]


def scrubbed_job(job: Job) -> Job:
    """`job`, run so that neither its errors nor Hydra's sweep file show a secret; an error
    is printed here (traceback included) and exits with code 1."""

    @functools.wraps(job)
    def run(cfg: DictConfig) -> None:
        try:
            scrub_sweep_file(cfg)
            job(cfg)
        except Exception as err:
            text = "".join(traceback.format_exception(err))
            print(scrub_text(text, cfg), file=sys.stderr, end="", flush=True)
            sys.exit(1)

    return run


def scrub_sweep_file(cfg: DictConfig) -> None:
    """The sweeper writes multirun.yaml before its first job starts; each job rewrites it if
    it still holds a secret (it holds `${oc.env:...}` unresolved, and the overrides as typed)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    path = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if not path.is_file():
        return
    text = path.read_text()
    scrubbed = scrub_text(text, cfg)
    if scrubbed != text:
        write_text_atomic(path, scrubbed)
