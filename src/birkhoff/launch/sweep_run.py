"""`birkhoff sweep NAME [overrides]`: every job of a sweep recipe, N at a time on this machine
or through Hydra's submitit launcher (SLURM, or its local executor).

Jobs are ordinary `birkhoff train` runs with `train.resume=auto` in their own run dir: a rerun
of the sweep skips finished jobs and resumes interrupted ones from their newest checkpoint.
Every job's recipe is composed and validated before the first one starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources, util
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from birkhoff.data import DataError, open_data
from birkhoff.errors import RecipeError
from birkhoff.launch.recipe import compose_recipe, load_recipe
from birkhoff.launch.sweep_config import (
    SweepConfig,
    SweepJob,
    earlier_jobs,
    expand,
    sweep_config,
    value_text,
    write_sweep_file,
)
from birkhoff.train.entry import check_data
from birkhoff.train.run_files import SUMMARY_FILE, finished_summary

LOG_FILE = "train.log"
EXIT_MARK = "# exit code "


@dataclass
class PlannedSweep:
    config: SweepConfig
    sweep_dir: Path
    jobs: list[SweepJob]
    job_overrides: list[str]  # every job's, before its swept value and seed
    hydra_overrides: list[str]  # the command line's hydra.* (the submitit launcher's settings)
    steps: dict[str, int]  # each job's train.steps, by name

    def finished(self, job: SweepJob) -> bool:
        steps = self.steps.get(job.name, next(iter(self.steps.values())))
        return finished_summary(self.sweep_dir / job.name, steps) is not None


def plan_sweep(name: str, args: list[str]) -> PlannedSweep:
    """Compose the sweep recipe with the command line and validate every job's recipe."""
    sweep_args = [a for a in args if a.startswith("sweep.")]
    hydra_args = [a for a in args if a.startswith(("hydra.", "hydra/"))]
    job_args = [a for a in args if a not in sweep_args and a not in hydra_args]
    cfg = _compose([f"+sweep={name}", *sweep_args, *job_args, *hydra_args], hydra=True)
    config = sweep_config(cfg, name)
    if config.launcher != "local" and not _has_submitit_launcher():
        raise RecipeError(
            "sweep.launcher",
            config.launcher,
            "needs Hydra's submitit launcher: pip install 'birkhoff[slurm]'",
        )
    fixed = list(config.overrides)
    if config.steps is not None:
        fixed.append(f"train.steps={config.steps}")
    job_overrides = [*fixed, *job_args]
    base = _compose(job_overrides)
    jobs = expand(config, int(base.train.seed))
    sweep_dir = Path(str(cfg.hydra.sweep.dir))
    job_overrides += [f"logging.wandb.group={sweep_dir.name}", "train.resume=auto"]
    steps = {}
    for job in jobs:
        recipe, _ = load_recipe(_compose([*job_overrides, *job.overrides(config.key)]), os.environ)
        steps[job.name] = recipe.train.steps
    passthrough = [a for a in hydra_args if not a.startswith("hydra.sweep.")]
    return PlannedSweep(config, sweep_dir, jobs, job_overrides, passthrough, steps)


def sweep_command(args: list[str]) -> int:
    if not args or args[0].startswith("-") or "=" in args[0]:
        print("birkhoff: usage: birkhoff sweep NAME [overrides] | report DIR", file=sys.stderr)
        return 2
    name, rest = args[0], args[1:]
    folder = resources.files("birkhoff.recipes") / "sweep"
    known = sorted(item.name[:-5] for item in folder.iterdir() if item.name.endswith(".yaml"))
    if name not in known:
        print(f"birkhoff: sweep {name!r}: no such sweep recipe; one of {', '.join(known)}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        planned = plan_sweep(name, rest)
        known = earlier_jobs(planned.sweep_dir, planned.config)
        # The tokenizer and data are built once here, not by the first jobs at the same time.
        recipe, _ = load_recipe(_compose(planned.job_overrides), os.environ)
        check_data(open_data(recipe.data), recipe)
        jobs = write_sweep_file(planned.sweep_dir, planned.config, known, planned.jobs)
    except (RecipeError, DataError) as err:
        print(f"birkhoff: {err}", file=sys.stderr)
        return 2
    todo = [job for job in jobs if not planned.finished(job)]
    print(
        f"birkhoff: sweep {name} over {planned.config.key}: {len(jobs)} jobs, "
        f"{len(jobs) - len(todo)} finished, {len(todo)} to run, in {planned.sweep_dir} "
        f"(rerun with hydra.sweep.dir={_quoted(planned.sweep_dir)} to resume it)",
        flush=True,
    )
    if planned.config.launcher == "local":
        failed = run_local(planned, todo)
    else:
        failed = run_hydra_launcher(planned, todo)
    print(
        f"birkhoff: sweep {name}: {len(todo) - failed} of {len(todo)} jobs ran to the end; "
        f"table and plots: birkhoff sweep report {planned.sweep_dir}",
        flush=True,
    )
    return 1 if failed else 0


def run_local(planned: PlannedSweep, todo: list[SweepJob]) -> int:
    """Run `todo` N at a time, each with its share of the cores; returns the failed count.
    SIGTERM/SIGINT reach every running job (they checkpoint and stop), then the sweep stops."""
    cores = os.cpu_count() or 1
    at_once = planned.config.jobs_at_once or max(1, cores // 2)
    threads = max(1, cores // at_once)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    waiting, running, failed = list(todo), {}, 0
    stop: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stop.append(signum)
        for process, _, _ in running.values():
            process.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while waiting or running:
            while waiting and len(running) < at_once and not stop:
                job = waiting.pop(0)
                running[job.name] = (_start(planned, job, env), job, time.monotonic())
            time.sleep(0.2)
            for name, (process, job, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                failed += process.returncode != 0
                with (planned.sweep_dir / job.name / LOG_FILE).open("a") as log:
                    log.write(f"{EXIT_MARK}{process.returncode}\n")  # read by the report
                _report_job(planned, job, process.returncode, time.monotonic() - started)
            if stop and not running:
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop:
        print(f"birkhoff: sweep stopped by {signal.Signals(stop[0]).name}; rerun to resume")
        sys.exit(128 + stop[0])
    return failed


def _start(planned: PlannedSweep, job: SweepJob, env: dict[str, str]) -> subprocess.Popen:
    run_dir = planned.sweep_dir / job.name
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "birkhoff.launch.cli",
        "train",
        *planned.job_overrides,
        *job.overrides(planned.config.key),
        *planned.hydra_overrides,
        f"hydra.run.dir={_quoted(run_dir)}",
    ]
    log = (run_dir / LOG_FILE).open("a")
    log.write(f"# birkhoff sweep: {' '.join(command[3:])}\n")
    log.flush()
    # Own session: a terminal's Ctrl-C reaches the sweep, which stops every job the same way.
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    log.close()
    print(f"birkhoff: started {job.name}", flush=True)
    return process


def _report_job(planned: PlannedSweep, job: SweepJob, code: int, seconds: float) -> None:
    run_dir = planned.sweep_dir / job.name
    if code == 0 and planned.finished(job):
        heldout = json.loads((run_dir / SUMMARY_FILE).read_text())["heldout_loss"]
        print(f"birkhoff: finished {job.name} in {seconds:.0f} s: held-out loss {heldout:.4f}")
    else:
        print(f"birkhoff: {job.name} exited with code {code}; see {run_dir / LOG_FILE}")
    sys.stdout.flush()


def run_hydra_launcher(planned: PlannedSweep, todo: list[SweepJob]) -> int:
    """One `birkhoff train --multirun` over the grid with Hydra's submitit launcher (SLURM,
    or its local executor); finished jobs return at once (train.resume=auto finds them done).
    Settings of the launcher come from the command line (hydra.launcher.partition=...)."""
    if not todo:
        return 0
    key = planned.config.key
    values = ",".join(value_text(v) for v in planned.config.values)
    seeds = sorted({job.seed for job in planned.jobs})
    excluded = sorted({item.split("=", 1)[0].lstrip("+~") for item in planned.job_overrides})
    launcher = "submitit_slurm" if planned.config.launcher == "slurm" else "submitit_local"
    command = [
        sys.executable,
        "-m",
        "birkhoff.launch.cli",
        "train",
        "--multirun",
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={_quoted(planned.sweep_dir)}",
        "hydra.sweep.subdir=${hydra.job.override_dirname}",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(excluded)}]",
        *planned.job_overrides,
        f"{key}={values}",
        f"train.seed={','.join(map(str, seeds))}",
        *planned.hydra_overrides,
    ]
    env = dict(os.environ)
    if launcher == "submitit_local":  # it starts every job at once: one thread each
        env["OMP_NUM_THREADS"] = "1"
    print(f"birkhoff: {launcher}: {len(todo)} jobs to run", flush=True)
    return 0 if subprocess.run(command, env=env).returncode == 0 else len(todo)


def _compose(overrides: list[str], hydra: bool = False) -> DictConfig:
    try:
        cfg = compose_recipe(overrides, with_hydra=hydra)
    except HydraException as err:
        reason = str(err).splitlines()[0]
        if reason.startswith("Could not override 'sweep."):
            allowed = ", ".join(f for f in SweepConfig.__dataclass_fields__ if f != "name")
            reason += f" sweep allows: {allowed}"
        raise RecipeError("command line", " ".join(overrides), reason) from None
    if hydra:
        OmegaConf.resolve(cfg.hydra.sweep)
    return cfg


def _has_submitit_launcher() -> bool:
    try:
        return util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


def _quoted(path: Path) -> str:
    """A path as one Hydra override value (job names hold '=' and ',')."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"
