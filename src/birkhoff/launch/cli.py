"""`birkhoff` CLI; `birkhoff train [overrides]` is a Hydra app over the packaged recipes."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from birkhoff.data import DataConfig, DataError, open_data
from birkhoff.data.commands import prepare_sources, write_tokenizer_model
from birkhoff.data.shards import verify_checksums
from birkhoff.errors import RecipeError, require
from birkhoff.launch.ckpt_command import ckpt_command
from birkhoff.launch.doctor import doctor_command
from birkhoff.launch.dry_run import dry_run
from birkhoff.launch.plan_command import plan_command
from birkhoff.launch.recipe import compose_recipe, load_recipe, recipe_to_dict, typed_recipe
from birkhoff.launch.scrubbed_job import scrubbed_job
from birkhoff.launch.spawn import launch_ranks
from birkhoff.launch.sweep_report import report_command
from birkhoff.launch.sweep_run import sweep_command
from birkhoff.launch.topology import Topology
from birkhoff.train import run_rank
from birkhoff.train.entry import check_data
from birkhoff.train.rank_errors import EXPECTED_ERRORS
from birkhoff.train.run_files import finished_summary, refuse_used_run_dir
from birkhoff.train.run_lock import RunDirLock
from birkhoff.train.secrets import scrub_recipe, scrub_text

USAGE = """usage: birkhoff <command> [args]

commands:
  train [overrides...]   train from the packaged recipes (Hydra): e.g.
                         birkhoff train model=small optim.lr=3e-4 train.steps=100
                         birkhoff train --multirun optim.lr=1e-3,3e-3
                         birkhoff train --cfg job        (print the composed recipe)
                         birkhoff train --help           (Hydra's help: groups and options)
                         birkhoff train ... --dry-run [--rank N]  (build rank N's share of
                         the layout on the meta device with a fake process group, print its
                         parameter shapes and memory, exit)
  data tokenizer [overrides...]
                         train a sentencepiece model on the recipe's sources and write it
                         to data.tokenizer.path (default: the cache)
  data prepare [overrides...]
                         tokenize every source once into shards under
                         data.prepare.output_dir (resumes an interrupted run)
  data verify DIR        check a prepared directory against its checksums
  plan [overrides...] [--json] [--top N] [--fused-attention] [--launches]
                         the layouts of a recipe on a cluster (cluster.preset=h100
                         cluster.devices=256, or the figures), fastest first, with memory
                         per device, bytes per collective, step time and MFU; with
                         parallel.* overrides, that one layout: does it fit, what dominates;
                         --launches also counts the eager kernel launches (host time)
  plan --published deepseek_v3
                         the model held against DeepSeek-V3's published run
  doctor [--json] [--backend auto|reference|cpu|triton|npu] [--ranks N] [--run-dir DIR]
                         what this machine can run: versions, device and memory, the kernel
                         backend's ops against the reference (error, speed), the local ranks'
                         collectives (values, bandwidth), the run dir's filesystem; exit 1
                         and one line per problem with its fix
  sweep NAME [overrides...]
                         every job of recipes/sweep/NAME.yaml (engram_split, engram_memory,
                         residual): the swept key's values x seeds, N at a time here or on
                         SLURM (sweep.launcher=slurm); rerun to skip finished jobs and resume
                         interrupted ones (same hydra.sweep.dir); e.g.
                         birkhoff sweep engram_split sweep.values=[0,0.2,0.4] sweep.seeds=2
  sweep report DIR [--no-plots]
                         the sweep's table (Markdown and CSV: per job and per value, mean and
                         spread over seeds) and plots (PNG), also of a sweep still running
  ckpt inspect PATH [--json]
                         a checkpoint's step, tokens, layout, tokenizer, completeness and
                         tensors (shapes, dtypes, sizes); the recipe with --json
  ckpt export PATH --to safetensors|hf [--out DIR] [--dtype bfloat16] [--max-shard-gib 5]
                         the model weights, consolidated from every rank's shards, as
                         safetensors files plus config.json (default DIR: PATH-safetensors)
"""
RECIPES = "pkg://birkhoff.recipes"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "data":
        return data_command(rest)
    if command == "ckpt":
        return ckpt_command(rest)
    if command == "plan":
        return plan_command(rest)
    if command == "doctor":
        return doctor_command(rest)
    if command == "sweep" and rest[:1] == ["report"]:
        return report_command(rest[1:])
    if command == "sweep":
        return sweep_command(rest)
    if command == "train" and "--dry-run" in rest:
        return dry_run_command(rest)
    if command == "train":
        sys.argv = ["birkhoff train", *rest]  # Hydra parses sys.argv
        job = scrubbed_job(train_job)
        hydra.main(version_base=None, config_path=RECIPES, config_name="config")(job)()
        return 0
    print(f"birkhoff: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def dry_run_command(args: list[str]) -> int:
    """`birkhoff train [overrides] --dry-run [--rank N]`: errors are one line, exit code 2."""
    args = [a for a in args if a != "--dry-run"]
    rank = 0
    if "--rank" in args:
        at = args.index("--rank")
        try:
            rank = int(args[at + 1])
        except (IndexError, ValueError):
            print("birkhoff: --rank needs a rank number, e.g. --rank 8", file=sys.stderr)
            return 2
        del args[at : at + 2]
    cfg = compose_recipe(args)
    try:
        print(dry_run(typed_recipe(cfg), rank))
    except RecipeError as err:
        print(f"birkhoff: {scrub_text(str(err), cfg)}", file=sys.stderr)
        return 2
    return 0


def data_command(args: list[str]) -> int:
    """`birkhoff data tokenizer|prepare|verify`: errors are one line and exit code 2."""
    # Composed before the try so that errors can be scrubbed of what it reads via oc.env.
    cfg = compose_recipe(args[1:]) if args[:1] in (["tokenizer"], ["prepare"]) else None
    try:
        if args[:1] == ["verify"] and len(args) == 2:
            count = verify_checksums(args[1])
            print(f"birkhoff: {args[1]}: {count} files match their checksums")
            return 0
        if args[:1] == ["tokenizer"]:
            print(f"birkhoff: tokenizer written to {write_tokenizer_model(_data_recipe(cfg))}")
            return 0
        if args[:1] == ["prepare"]:
            prepare_sources(_data_recipe(cfg), show=sys.stdout.isatty())
            return 0
    except (RecipeError, DataError) as err:
        print(f"birkhoff: {scrub_text(str(err), cfg)}", file=sys.stderr)
        return 2
    print(
        f"birkhoff: usage: birkhoff data tokenizer|prepare [overrides] | verify DIR\n\n{USAGE}",
        file=sys.stderr,
    )
    return 2


def _data_recipe(cfg: DictConfig) -> DataConfig:
    """The recipe's `data` section, validated like `birkhoff train` does."""
    recipe, _ = load_recipe(cfg, os.environ)
    return recipe.data


def train_job(cfg: DictConfig) -> None:
    """One Hydra job: validate, prepare the data once, then run or start the ranks.

    Ranks train with the resolved recipe and write only its public copy (train/secrets.py).
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    lock = RunDirLock(run_dir)  # taken before anything is written; rank 0 takes it across nodes
    try:
        try:
            recipe, topology = load_recipe(cfg, os.environ)
            if topology.nnodes == 1:
                lock.acquire()
            if recipe.train.resume == "auto" and finished_summary(run_dir, recipe.train.steps):
                print(f"birkhoff: {run_dir} already finished its {recipe.train.steps} steps")
                return
            check_run_dir(run_dir, topology, resuming=bool(recipe.train.resume))
            data = open_data(recipe.data)
            check_data(data, recipe)
        except (RecipeError, DataError) as err:
            _fail(err, cfg)
        if cfg.train.get("micro_batch_size") is None:
            print(
                f"birkhoff: train.micro_batch_size derived: {recipe.train.micro_batch_size} "
                f"({recipe.train.grad_accum_steps(recipe.parallel.resolved_dp(topology.world_size))}"
                " micro-batch(es) per rank and step)",
                flush=True,
            )
        private = recipe_to_dict(recipe)
        public = scrub_recipe(private, cfg)
        print(
            f"birkhoff: {topology.world_size} rank(s) on {topology.nnodes} node(s), "
            f"run dir {run_dir}",
            flush=True,
        )
        if topology.world_size > 1:
            status = launch_ranks(topology, private, str(run_dir), public)
            if status:
                sys.exit(status)
            return
        try:
            summary = run_rank(private, str(run_dir), data, public)
        except EXPECTED_ERRORS as err:
            _fail(err, cfg)
        if summary["stopped_by"]:
            print(
                f"birkhoff: stopped by {summary['stopped_by']}; resume with "
                "train.resume=auto in the same run dir",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(128 + signal.Signals[summary["stopped_by"]])
    finally:
        lock.release()
        _remove_if_empty(run_dir)  # on a node without global rank 0 nothing was written


def _fail(err: Exception, cfg: DictConfig) -> NoReturn:
    """A refusal (recipe, data, checkpoint, diverged training): one line, exit code 2."""
    print(f"birkhoff: {scrub_text(str(err), cfg)}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_run_dir(run_dir: Path, topology: Topology, resuming: bool = False) -> None:
    """Nodes must share one run dir; a single node refuses a used one before starting ranks
    (unless the run resumes: it continues the run dir's files).

    Across nodes only global rank 0 checks, after the rendezvous: the rendezvous decides which
    node hosts it, and the other nodes may see its files appear at any time.
    """
    if topology.nnodes == 1:
        if not resuming:
            refuse_used_run_dir(run_dir)
        return
    given = any(item.startswith("hydra.run.dir=") for item in HydraConfig.get().overrides.hydra)
    require(
        given or "SLURM_JOB_ID" in os.environ,
        "hydra.run.dir",
        str(run_dir),
        f"a {topology.nnodes}-node run needs one run dir shared by every node: pass "
        "hydra.run.dir=/shared/path on each node (inside SLURM it defaults to the job id)",
    )


def _remove_if_empty(run_dir: Path) -> None:
    """Hydra creates the run dir before the job runs; a job that wrote nothing leaves nothing."""
    with contextlib.suppress(OSError):
        run_dir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
