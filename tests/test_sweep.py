"""`birkhoff sweep` and `birkhoff sweep report` on a small engram_split sweep: stopped, resumed
through Hydra's submitit launcher, finished; the report's numbers against the jobs' own files
and the models they built."""

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.checkpoint import FileSystemReader

from birkhoff.launch.sweep_run import plan_sweep, sweep_command

pytestmark = pytest.mark.timeout(600)

# Every job's own overrides: a model small enough that starting a job costs more than its steps.
JOB = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.ffn_hidden_size=128",
    "model.moe.expert_ffn_hidden_size=32",
    "model.engram.layers=[1]",
    "model.engram.embed_dim=8",
    "model.sparse_budget=200000",
    "data.seq_len=64",
    "optim.warmup_steps=1",
    "train.eval_every=4",
    "train.eval_batches=2",
]
SMALL = ["sweep.values=[0.0,0.3]", "sweep.seeds=2", "sweep.steps=8", "sweep.jobs_at_once=1", *JOB]
NAMES = [
    f"model.engram_fraction={value},train.seed={seed}"
    for value in ("0.0", "0.3")
    for seed in (1234, 1235)
]


def birkhoff(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "birkhoff.launch.cli", *args],
        capture_output=True,
        text=True,
        **kwargs,
    )


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def built_model(run_dir: Path) -> tuple[int, int]:
    """(routed experts, Engram table rows over all layers) of the job's final checkpoint."""
    step = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    metadata = FileSystemReader(step).read_metadata().state_dict_metadata
    shapes = {k: v.size for k, v in metadata.items() if k.startswith("model.")}
    experts = shapes["model.blocks.0.ffn.experts.w_gate"][0]
    rows = sum(size[0] for key, size in shapes.items() if key.endswith("engram.table.weight"))
    return experts, rows


def test_sweep_stops_resumes_skips_and_reports(tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    args = ["engram_split", *SMALL, f"hydra.sweep.dir={sweep_dir}"]
    first = sweep_dir / NAMES[0]
    driver = subprocess.Popen(
        [sys.executable, "-m", "birkhoff.launch.cli", "sweep", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while '"step": 2,' not in _text(first / "metrics.jsonl"):
        assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)  # pre-emption: the job checkpoints and stops
    out, _ = driver.communicate(timeout=180)
    assert driver.returncode == 128 + signal.SIGTERM, out
    stopped = json.loads((first / "summary.json").read_text())
    assert stopped["stopped_by"] == "SIGTERM" and stopped["steps"] < 8
    assert not (sweep_dir / NAMES[1]).exists()

    partial = birkhoff("sweep", "report", str(sweep_dir), "--no-plots")
    assert partial.returncode == 0, partial.stderr
    report = (sweep_dir / "report.md").read_text()
    assert "PARTIAL" in report and "| stopped (SIGTERM) |" in report and "| pending |" in report

    # Resumed through Hydra's submitit launcher (local executor, as on SLURM): the stopped job
    # continues from its checkpoint, the others start; the job dirs are the same.
    again = birkhoff("sweep", *args, "sweep.launcher=submitit_local")
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = f"resumed from {first}/checkpoints/step-{stopped['steps']:08d}"
    assert any(resumed in log.read_text() for log in sweep_dir.glob(".submitit/*/*.out")), (
        "the stopped job did not resume from its checkpoint"
    )
    assert sorted(p.name for p in sweep_dir.glob("model.*")) == NAMES
    summaries = [json.loads((sweep_dir / n / "summary.json").read_text()) for n in NAMES]
    assert all(s["steps"] == 8 and s["stopped_by"] is None for s in summaries)

    metrics_before = [(sweep_dir / n / "metrics.jsonl").read_text() for n in NAMES]
    rerun = birkhoff("sweep", *args)
    assert "4 jobs, 4 finished, 0 to run" in rerun.stdout and "started" not in rerun.stdout
    direct = birkhoff(  # what a SLURM job of a finished run does: nothing
        "train", "model=sweep_cpu", "train=sweep_cpu", "optim=adamw_cosine", *JOB,
        "model.engram_fraction=0.0", "train.steps=8", "train.resume=auto",
        f"hydra.run.dir='{first}'",
    )  # fmt: skip
    assert direct.returncode == 0 and "already finished its 8 steps" in direct.stdout
    assert [(sweep_dir / n / "metrics.jsonl").read_text() for n in NAMES] == metrics_before

    done = birkhoff("sweep", "report", str(sweep_dir))
    assert done.returncode == 0, done.stderr
    with (sweep_dir / "points.csv").open() as file:
        points = list(csv.DictReader(file))
    assert [p["value"] for p in points] == ["0.0", "0.3"]
    means = []
    for point, names in zip(points, (NAMES[:2], NAMES[2:]), strict=True):
        heldout = [
            json.loads((sweep_dir / n / "summary.json").read_text())["heldout_loss"] for n in names
        ]
        means.append(statistics.mean(heldout))
        assert float(point["heldout_mean"]) == pytest.approx(means[-1], rel=1e-9)
        assert float(point["heldout_std"]) == pytest.approx(statistics.stdev(heldout), rel=1e-6)
        # the report reads metrics.jsonl; the trainer's own summary holds its last loss
        finals = [
            json.loads((sweep_dir / n / "summary.json").read_text())["last_loss"] for n in names
        ]
        assert float(point["final_mean"]) == pytest.approx(statistics.mean(finals), rel=1e-6)
        assert float(point["final_std"]) == pytest.approx(statistics.stdev(finals), rel=1e-6)
        experts, rows = built_model(sweep_dir / names[0])
        assert (int(point["experts"]), int(point["engram_rows"])) == (experts, rows)
        assert point["finished"] == "2"
    assert [p["best"] for p in points] == [str(m == min(means)) for m in means]
    assert "PARTIAL" not in (sweep_dir / "report.md").read_text()
    for name in ("heldout_loss", "loss_curves", "engram_gate_mean", "engram_rows_touched"):
        png = (sweep_dir / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
    assert_plots_draw_the_jobs(sweep_dir, monkeypatch, means)


def assert_plots_draw_the_jobs(sweep_dir: Path, monkeypatch, means: list[float]) -> None:
    """What the plots draw, read off their figures (the report made again in this process):
    the held-out means with their error bars at the swept values and the best starred, and
    each job's loss curve ending at the running mean of its last 20 logged losses (read here
    from metrics.jsonl)."""
    from birkhoff.launch import sweep_plots
    from birkhoff.launch.sweep_report import write_report

    figures = {}

    def keep(fig, _, name: str) -> str:
        figures[name] = fig
        return name

    monkeypatch.setattr(sweep_plots, "_save", keep)
    write_report(sweep_dir)
    heldout = figures["heldout_loss.png"].axes[0]
    (bars,) = heldout.containers
    assert list(bars.lines[0].get_xdata()) == [0.0, 0.3]
    assert list(bars.lines[0].get_ydata()) == pytest.approx(means, rel=1e-12)
    stars = [c for c in heldout.collections if hasattr(c, "get_sizes")]
    (best,) = [c for c in stars if c.get_sizes().tolist() == [220]]
    assert best.get_offsets().tolist() == [[[0.0, 0.3][means.index(min(means))], min(means)]]
    curves = [line for line in figures["loss_curves.png"].axes[0].lines if line.get_marker() != "o"]
    ends = sorted(line.get_ydata()[-1] for line in curves)
    expected = []
    for name in NAMES:
        losses = {}
        for line in (sweep_dir / name / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                losses[record["step"]] = record["loss"]  # a resumed step: its last value
        ordered = [losses[step] for step in sorted(losses)]
        expected.append(statistics.fmean(ordered[-20:]))
    assert ends == pytest.approx(sorted(expected), rel=1e-9)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["nope"], "no such sweep recipe; one of engram_memory, engram_split, residual"),
        (["engram_split", "sweep.seeds=0"], "'sweep.seeds' = 0: must be >= 1"),
        (["engram_split", "sweep.values=[0.1,1.5]"], "'model.engram_fraction' = 1.5"),
        (["engram_split", "sweep.values=[]"], "must list at least one value"),
        (["engram_split", "sweep.bogus=1"], "sweep allows: key, values, seeds"),
        (["residual", "model.residual.n_streams=0"], "model.residual.n_streams"),
    ],
)
def test_bad_sweeps_are_refused_before_any_job(tmp_path, capsys, args, expected):
    sweep_dir = tmp_path / "sweep"
    assert sweep_command([*args, f"hydra.sweep.dir={sweep_dir}"]) == 2
    assert expected in capsys.readouterr().err
    assert not sweep_dir.exists()


def test_a_sweep_dir_of_another_key_is_refused(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text(json.dumps({"key": "model.residual.mode", "jobs": []}))
    code = sweep_command(["engram_split", f"hydra.sweep.dir={sweep_dir}"])
    assert code == 2
    assert "holds a sweep over model.residual.mode" in capsys.readouterr().err
    assert os.listdir(sweep_dir) == ["sweep.json"]


@pytest.mark.parametrize(
    "name, key, jobs",
    [
        ("engram_split", "model.engram_fraction", 18),
        ("engram_memory", "model.engram.table_size", 12),
        ("residual", "model.residual.mode", 9),
    ],
)
def test_every_shipped_sweep_recipe_validates(name, key, jobs):
    planned = plan_sweep(name, [])
    assert planned.config.key == key and len(planned.jobs) == jobs


def test_a_sweep_s_jobs_log_to_wandb_as_one_group(tmp_path, monkeypatch):
    """Every job's recipe names the sweep dir as its wandb group, and the wandb run each job
    starts gets it (wandb.init recorded here, not called)."""
    from types import SimpleNamespace

    import wandb

    from birkhoff.launch.recipe import load_recipe, recipe_to_dict
    from birkhoff.train.entry import train_recipe_from_dict
    from birkhoff.train.metrics import build_metric_logger
    from conftest import compose_recipe

    sweep_dir = tmp_path / "split-lr3e-3"
    args = [f"hydra.sweep.dir={sweep_dir}", "logging.wandb.enabled=true"]
    planned = plan_sweep("engram_split", args)
    started = []
    run = SimpleNamespace(log=lambda *a, **k: None, finish=lambda *a, **k: None)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: started.append(kwargs) or run)
    for job in planned.jobs[:3]:
        overrides = [*planned.job_overrides, *job.overrides(planned.config.key)]
        recipe, _ = load_recipe(compose_recipe(overrides), env={})
        public = recipe_to_dict(recipe)
        typed = train_recipe_from_dict(public)
        build_metric_logger(typed.logging, tmp_path / job.name, 1, public, True).close()
    assert [kwargs["group"] for kwargs in started] == ["split-lr3e-3"] * 3
