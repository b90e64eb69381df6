"""A sweep recipe (recipes/sweep/NAME.yaml) and the jobs it expands to.

A sweep varies one recipe key over `values`, each with `seeds` seeds (train.seed, +1, ...);
every job is an ordinary `birkhoff train` run dir under the sweep dir, named after its swept
overrides the way Hydra names multirun jobs (`hydra.job.override_dirname`), so the local
runner and Hydra's submitit launcher put a job in the same place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from birkhoff.atomic import write_text_atomic
from birkhoff.errors import RecipeError, require, require_choice

SWEEP_FILE = "sweep.json"
LAUNCHERS = ("local", "slurm", "submitit_local")


@dataclass
class SweepConfig:
    name: str
    key: str
    values: list[Any]
    seeds: int = 1
    steps: int | None = None
    jobs_at_once: int | None = None
    launcher: str = "local"
    overrides: list[str] = field(default_factory=list)
    # a published optimum drawn beside the measured curve: [low, high] and its label
    reference_range: list[float] | None = None
    reference_label: str | None = None

    def validate(self) -> None:
        require(bool(self.key), "sweep.key", self.key, "must name the recipe key to vary")
        require(bool(self.values), "sweep.values", self.values, "must list at least one value")
        for value in self.values:
            require(
                isinstance(value, int | float | str | bool),
                "sweep.values",
                value,
                "must be numbers or strings (one value of sweep.key per grid point)",
            )
        require(
            len({value_text(v) for v in self.values}) == len(self.values),
            "sweep.values",
            self.values,
            "holds a value twice",
        )
        require(self.seeds >= 1, "sweep.seeds", self.seeds, "must be >= 1")
        require(self.steps is None or self.steps >= 1, "sweep.steps", self.steps, "must be >= 1")
        require(
            self.jobs_at_once is None or self.jobs_at_once >= 1,
            "sweep.jobs_at_once",
            self.jobs_at_once,
            "must be >= 1 (null: one job per 2 cores of this machine)",
        )
        require_choice("sweep.launcher", self.launcher, LAUNCHERS)
        require(
            self.reference_range is None or len(self.reference_range) == 2,
            "sweep.reference_range",
            self.reference_range,
            "must be [low, high] or null",
        )
        for item in self.overrides:
            require(
                "=" in item and not item.startswith("sweep."),
                "sweep.overrides",
                item,
                "must be recipe overrides key=value (not sweep.* keys)",
            )


@dataclass(frozen=True)
class SweepJob:
    """One run of the sweep: the swept value, its seed and its run dir (relative name)."""

    value: Any
    seed: int
    name: str

    def overrides(self, key: str) -> list[str]:
        return [f"{key}={value_text(self.value)}", f"train.seed={self.seed}"]


def sweep_config(cfg: DictConfig, name: str) -> SweepConfig:
    section = OmegaConf.to_container(cfg.sweep, resolve=True)
    section["name"] = name
    try:
        config = SweepConfig(**section)
    except TypeError as err:
        allowed = ", ".join(f for f in SweepConfig.__dataclass_fields__ if f != "name")
        raise RecipeError("sweep", sorted(section), f"{err}; sweep allows: {allowed}") from None
    config.validate()
    return config


def job_name(key: str, value: Any, seed: int) -> str:
    """Hydra's override_dirname of the swept overrides: `key=value` pairs sorted by key."""
    pairs = sorted([(key, value_text(value)), ("train.seed", str(seed))])
    return ",".join(f"{k}={v}" for k, v in pairs)


def expand(config: SweepConfig, base_seed: int) -> list[SweepJob]:
    """Grid point by grid point, seeds within (the order jobs start in)."""
    return [
        SweepJob(value, base_seed + i, job_name(config.key, value, base_seed + i))
        for value in config.values
        for i in range(config.seeds)
    ]


def value_text(value: Any) -> str:
    """How a swept value is written on a command line and in a job's name (as Hydra does)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def earlier_jobs(sweep_dir: Path, config: SweepConfig) -> list[SweepJob]:
    """The jobs a sweep dir already records; a rerun may add values or seeds, never change the
    key (checked before any work)."""
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    require(
        earlier["key"] == config.key,
        "sweep.key",
        config.key,
        f"{sweep_dir} holds a sweep over {earlier['key']}; choose another hydra.sweep.dir",
    )
    return [SweepJob(**job) for job in earlier["jobs"]]


def write_sweep_file(
    sweep_dir: Path, config: SweepConfig, known: list[SweepJob], jobs: list[SweepJob]
) -> list[SweepJob]:
    """Record the sweep: the `known` jobs and the new ones of `jobs`; returns them all."""
    names = {job.name for job in known}
    every = known + [job for job in jobs if job.name not in names]
    record = {**asdict(config), "jobs": [asdict(job) for job in every]}
    write_text_atomic(sweep_dir / SWEEP_FILE, json.dumps(record, indent=2) + "\n")
    return every


def read_sweep_file(sweep_dir: Path) -> tuple[dict[str, Any], list[SweepJob]]:
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise RecipeError(
            "sweep dir", str(sweep_dir), f"has no {SWEEP_FILE}: give a dir `birkhoff sweep` made"
        )
    record = json.loads(path.read_text())
    return record, [SweepJob(**job) for job in record["jobs"]]
