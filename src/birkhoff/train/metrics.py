"""Metric sinks: console (rich progress bar or plain lines), JSONL file, wandb."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from birkhoff.errors import require
from birkhoff.train.config import LoggingConfig
from birkhoff.train.run_files import METRICS_FILE, finite_or_null

Record = dict[str, Any]


class Sink(Protocol):
    def log(self, record: Record) -> None: ...
    def close(self) -> None: ...


def format_record(record: Record) -> str:
    """One human line: `step 10/300 | loss 5.4321 | lr 3.00e-03 | ...`."""
    parts = []
    for key, value in record.items():
        if key == "step":
            parts.append(f"step {value}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}" if "loss" not in key else f"{key} {value:.4f}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


class PlainConsoleSink:
    """A line every `log_every` steps, on the last step, and for every eval."""

    def __init__(self, total_steps: int, log_every: int) -> None:
        self.total_steps = total_steps
        self.log_every = log_every

    def log(self, record: Record) -> None:
        step = record["step"]
        if "eval_loss" in record or step % self.log_every == 0 or step == self.total_steps:
            print(format_record(record), flush=True)

    def close(self) -> None:
        pass


class RichConsoleSink:
    """A live progress bar with the latest metrics; evals print above it."""

    def __init__(self, total_steps: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=Console(),
        )
        self.task = self.progress.add_task("train", total=total_steps, metrics="")
        self.progress.start()

    def log(self, record: Record) -> None:
        if "eval_loss" in record:
            self.progress.console.print(format_record(record))
            return
        shown = {k: record[k] for k in ("loss", "lr", "tokens_per_s") if k in record}
        self.progress.update(self.task, completed=record["step"], metrics=format_record(shown))

    def close(self) -> None:
        self.progress.stop()


class JsonlSink:
    """metrics.jsonl: one JSON object per line, flushed as written so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")

    def log(self, record: Record) -> None:
        self.file.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class WandbSink:
    """A wandb run that records only the public recipe: names and tags come from it too, and
    no command line, environment, code or git state is collected (they may hold secrets)."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, recipe: Record) -> None:
        import wandb

        public = recipe["logging"]["wandb"]
        for key in ("project", "entity"):  # where the run goes: the public value must be usable
            require(
                public[key] == getattr(cfg.wandb, key),
                f"logging.wandb.{key}",
                public[key],
                "must be given as is: one read from the environment or holding a secret would "
                "be recorded with the wandb run",
            )
        self.run = wandb.init(
            project=public["project"],
            entity=public["entity"],
            name=public["name"],
            mode=cfg.wandb.mode,
            tags=list(public["tags"]),
            group=public["group"],
            dir=str(run_dir),
            config=recipe,
            save_code=False,
            settings=wandb.Settings(
                silent=True,
                x_disable_meta=True,  # the system metadata holds sys.argv
                disable_code=True,
                disable_git=True,
                save_code=False,
            ),
        )

    def log(self, record: Record) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MetricLogger:
    """Fans each record out to the sinks (rank 0 has them; other ranks have none)."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, record: Record) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_metric_logger(
    cfg: LoggingConfig, run_dir: Path, total_steps: int, recipe: Record, is_main: bool
) -> MetricLogger:
    if not is_main:
        return MetricLogger([])
    run_dir.mkdir(parents=True, exist_ok=True)
    interactive = cfg.console == "rich" or (cfg.console == "auto" and sys.stdout.isatty())
    console: Sink = (
        RichConsoleSink(total_steps)
        if interactive
        else PlainConsoleSink(total_steps, cfg.log_every)
    )
    sinks: list[Sink] = [console]
    if cfg.jsonl:
        sinks.append(JsonlSink(run_dir / METRICS_FILE))
    if cfg.wandb.enabled:
        sinks.append(WandbSink(cfg, run_dir, recipe))
    return MetricLogger(sinks)
