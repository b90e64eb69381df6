"""The training loop: micro-batches with gradient accumulation, clipping, AdamW, evals, metrics."""

from __future__ import annotations

import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule

from birkhoff.checkpoint.space import SaveFailed
from birkhoff.checkpoint.state import TrainingState
from birkhoff.data import (
    Batch,
    BatchBuilder,
    DataPlan,
    EngramHasher,
    Layout,
    TrainLoader,
    heldout_windows,
)
from birkhoff.data.compression import tokenizer_compression
from birkhoff.parallel import DistributedContext
from birkhoff.parallel.device import peak_memory_mib
from birkhoff.parallel.fsdp import DTYPES
from birkhoff.parallel.grad_norm import clip_grad_norm
from birkhoff.parallel.parallelize import wrap_ddp
from birkhoff.train.anticipatory import AnticipatoryRouting
from birkhoff.train.attention_stats import indexer_stats
from birkhoff.train.checkpointing import (
    checkpoint_manager,
    refuse_non_finite_parameters,
    resume,
    save,
)
from birkhoff.train.engram_stats import EngramStats
from birkhoff.train.expert_balance import balance_experts
from birkhoff.train.indexer_warmup import dense_indexing, keep_only_indexer_gradients
from birkhoff.train.metrics import MetricLogger
from birkhoff.train.mfu import mfu_meter
from birkhoff.train.model_share import build_share
from birkhoff.train.optim import build_optimizer
from birkhoff.train.phase_schedules import PhaseSchedules
from birkhoff.train.recipe import TrainRecipe
from birkhoff.train.residual import check_residual_constraint, residual_stats
from birkhoff.train.spikes import StepGuard
from birkhoff.train.stop import StopSignal
from birkhoff.train.stragglers import StragglerMonitor
from birkhoff.train.watchdog import HangWatchdog
from birkhoff.train.weight_casts import (
    backward_context,
    resolve_weight_casts,
    step_casts_of,
    step_context,
)


def seed_everything(seed: int, deterministic: bool) -> None:
    if deterministic:
        # cuBLAS refuses deterministic mode without a fixed workspace; harmless elsewhere.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic)


class Trainer:
    def __init__(
        self,
        recipe: TrainRecipe,
        data: DataPlan,
        ctx: DistributedContext,
        device: torch.device,
        metrics: MetricLogger,
        run_dir: Path | None = None,
        public_recipe: dict[str, Any] | None = None,
    ) -> None:
        """`run_dir`: where checkpoints go (recipe `checkpoint.dir` overrides it); without
        one the trainer neither saves nor resumes. `public_recipe`: the recipe scrubbed of
        secrets that checkpoints record (see train/secrets.py)."""
        self.recipe = recipe
        self.public_recipe = public_recipe
        self.data = data
        self.ctx = ctx
        self.device = device
        self.metrics = metrics
        train_cfg = recipe.train
        self.dp_size = ctx.dp_size
        self.grad_accum = train_cfg.grad_accum_steps(self.dp_size)
        seed_everything(train_cfg.seed, train_cfg.deterministic)
        tokenizer = data.tokenizer
        compression = tokenizer_compression(tokenizer)
        share = build_share(recipe, ctx, device, compression, tokenizer.pad_id, self.grad_accum)
        self.model_cfg = share.cfg
        self.kernel_backend = share.kernels
        self.compiled_blocks = share.compiled_blocks
        self.has_indexer = "csa" in share.cfg.attention.layer_types  # every rank: all CSA layers
        self.hasher = self._engram_hasher(compression)
        self.pipeline = share.pipeline
        self.model_parts = share.parts
        # Called with the trainer once a step's gradients are complete (before clipping).
        self.after_backward: list[Callable[[Trainer], None]] = share.after_backward
        self.model = self.model_parts[0]
        self.weight_casts = resolve_weight_casts(train_cfg, recipe.parallel, ctx.world_size)
        self.step_casts = step_casts_of(self.model_parts)
        self.parallel_model = wrap_ddp(self.model, ctx, recipe.parallel)
        # One optimizer per part, so optimizer state is keyed by the whole model's names.
        built = [build_optimizer(p, recipe.optim, train_cfg.steps) for p in self.model_parts]
        self.optimizers = [optimizer for optimizer, _ in built]
        self.schedulers = [scheduler for _, scheduler in built]
        self.state = TrainingState(self.model_parts, self.optimizers, self.schedulers)
        self.checkpoints = checkpoint_manager(recipe, run_dir, ctx)
        self.layout = Layout(
            train_cfg.global_batch_size,
            train_cfg.micro_batch_size,
            ctx.dp_rank,
            self.dp_size,
            train_cfg.seed,
        )
        self.build_batch = BatchBuilder(tokenizer.eos_id, recipe.data.document_mask, self.hasher)
        self.loader = TrainLoader(data, self.layout, self.build_batch)
        self.heldout = heldout_windows(data, train_cfg.eval_batches * train_cfg.global_batch_size)
        self.tokens_per_step = train_cfg.global_batch_size * recipe.data.seq_len
        self.mfu = mfu_meter(recipe, device, ctx.world_size)
        self.routed_per_layer = self.tokens_per_step * recipe.model.moe.top_k
        self.sequences = train_cfg.global_batch_size
        self.stragglers = StragglerMonitor(
            ctx, device, recipe.logging.log_every, train_cfg.straggler_warn_ratio
        )
        mtp = share.cfg.mtp
        self.phases = PhaseSchedules(train_cfg, recipe.optim, mtp.loss_weight, mtp.depth > 0)
        self.step = 0
        self.guard = StepGuard(train_cfg.spike, train_cfg.fault, train_cfg.on_bad_step,
                               train_cfg.max_bad_steps)  # fmt: skip
        self.routing = AnticipatoryRouting.of(train_cfg.anticipatory, self.model_parts)
        self.engram_stats = EngramStats()

    def fit(
        self,
        stop: StopSignal | None = None,
        watchdog: HangWatchdog | None = None,
        restart: int = 0,
    ) -> dict[str, Any]:
        """Train for `train.steps` steps; returns the run summary (losses, throughput).
        `stop`: the caller's signal recorder (the rank's entry point installs one for the
        whole process lifetime), else one for the duration of training. `watchdog`: told
        after every step, evaluation and checkpoint that the run moves on. `restart`: the
        elastic agent's restart count, logged as metric `restart` at the resumed step."""
        try:
            with nullcontext(stop) if stop else StopSignal() as stop:
                return self._fit(stop, watchdog or HangWatchdog(None, None), restart)
        finally:
            # The loader's workers end now. Left to the garbage collector (a trainer sits in
            # reference cycles), DataLoader's shutdown waits out its join timeout per worker:
            # the collector closes the index queues' feeders before the iterator's __del__
            # sends the workers their stop.
            self.loader.close()

    def _fit(self, stop: StopSignal, watchdog: HangWatchdog, restart: int) -> dict[str, Any]:
        cfg = self.recipe.train
        if self.checkpoints is not None:
            resume(self, self.checkpoints)
            watchdog.progress(self.step)
        self.guard.take(self)  # a spike in the first steps can roll back to the start
        if restart:
            self.metrics.log({"step": self.step, "restart": restart})
        first_loss = last_loss = float("nan")
        start, first_step = time.perf_counter(), self.step
        step_times = []  # of this process's steps: the first one compiles under train.compile
        while self.step < cfg.steps:
            record = self.train_step()
            step_times.append(record["step_time_s"])
            watchdog.progress(self.step)
            applied = not record.get("skipped")
            stopping = stop.requested(self.ctx)
            if applied:
                first_loss = record["loss"] if self.step == first_step + 1 else first_loss
                last_loss = record["loss"]
                last = self.step == cfg.steps or stopping
                record.update(self.stragglers.report(self.step, last))
            if stopping:  # said at once: a late signal or a slow save must not lose it
                self._announce_stop(stop.agreed)
            record.update(self._checkpoint(self.step == cfg.steps or stopping))
            watchdog.progress(self.step)
            self.metrics.log(record)
            if stopping:
                break
            evaluate = applied and cfg.eval_every and self.step % cfg.eval_every == 0
            if evaluate and self.step < cfg.steps:
                self.metrics.log(self._eval_record())
                watchdog.progress(self.step)
        final = self._eval_record()  # overlaps a background checkpoint write
        heldout_loss = final["eval_loss"]
        watchdog.progress(self.step)
        self.metrics.log(final)
        self._finish_checkpoints()
        elapsed = time.perf_counter() - start
        median = statistics.median(step_times[1:]) if step_times[1:] else None
        # the steps alone at their median, without the first (compiles, JIT) and without
        # evaluations and saves: what a longer run approaches; tokens_per_s is the wall's
        steady = self.tokens_per_step / median if median else None
        return {
            "steps": self.step,
            "first_loss": first_loss,
            "last_loss": last_loss,
            "heldout_loss": heldout_loss,
            "tokens": self.step * self.tokens_per_step,
            "seconds": elapsed,
            "tokens_per_s": (self.step - first_step) * self.tokens_per_step / elapsed,
            "mfu": self.mfu.mfu((self.step - first_step) * self.tokens_per_step / elapsed),
            "steady_tokens_per_s": steady,
            "steady_mfu": self.mfu.mfu(steady) if steady else None,
            "world_size": self.ctx.world_size,
            "first_step_s": step_times[0] if step_times else None,
            "median_step_s": median,
            "stopped_by": signal.Signals(stop.agreed).name if stop.agreed else None,
            "bad_steps": self.guard.bad_steps,
            "spikes": self.guard.spikes,
            "rollbacks": self.guard.rollbacks,
        }

    def _checkpoint(self, last: bool) -> dict[str, float]:
        """Save if one is due; the metrics: seconds the step was blocked, and the whole
        save's seconds once a (background) save is complete."""
        if self.checkpoints is None:
            return {}
        timings: dict[str, float] = {}
        try:
            if self.checkpoints.due(self.step, last):
                refuse_non_finite_parameters(self)
                timings["checkpoint_blocked_s"] = save(self, self.checkpoints)
            written = self.checkpoints.completed()
        except SaveFailed as failed:
            self._periodic_save_failed(failed, last)
            return {**timings, "checkpoint_failed": 1}
        if written is not None:
            timings["checkpoint_write_s"] = written
        return timings

    def _periodic_save_failed(self, failed: SaveFailed, last: bool) -> None:
        """Say so and go on, unless the save was of the final step (its state would be lost:
        the run stops with the reason)."""
        if last and failed.step == self.step:
            raise failed
        if self.ctx.is_main:
            print(f"birkhoff: {failed}; training goes on", file=sys.stderr, flush=True)

    def _finish_checkpoints(self) -> None:
        if self.checkpoints is None:
            return
        try:
            written = self.checkpoints.completed(wait=True)
        except SaveFailed as failed:
            self._periodic_save_failed(failed, last=True)
            self.metrics.log({"step": self.step, "checkpoint_failed": 1})
            written = None
        finally:
            self.checkpoints.close()
        if written is not None:
            self.metrics.log({"step": self.step, "checkpoint_write_s": written})

    def _announce_stop(self, signal_number: int | None) -> None:
        if self.ctx.is_main:
            name = signal.Signals(signal_number).name if signal_number else "a signal"
            where = "writing a checkpoint" if self.checkpoints else "no checkpoint dir"
            print(
                f"birkhoff: {name} on a rank: stopped after step {self.step}; {where}",
                flush=True,
            )

    def train_step(self) -> dict[str, Any]:
        step_start = time.perf_counter()
        self.parallel_model.train()
        micro_batches = self.routing.next_batch(self)
        data_wait = time.perf_counter() - step_start - self.routing.seconds
        cpu_start = time.process_time()
        warming = self.step < self.recipe.train.indexer_warmup_steps
        self.phases.apply(self.model_parts, self.step)
        with dense_indexing(self.model_parts, warming):
            loss_sum = self.forward_backward(micro_batches)
        for hook in self.after_backward:
            hook(self)
        if warming:
            keep_only_indexer_gradients(self.model_parts)
        self.guard.scale_gradients(self)
        residual = self._check_residual_constraint()
        grad_norm = self._clip_gradients()
        loss = self.reduce_loss(loss_sum)  # both agreed over ranks: all take one decision
        self.routing.clear()
        why = self.guard.verdict(loss, grad_norm)
        if why is not None:
            record = self.guard.skip(self, why, loss, grad_norm)
            return {**record, "step_time_s": time.perf_counter() - step_start}
        lr = self.schedulers[0].get_last_lr()[0]
        with self.guard.scaled_update(self):
            for optimizer in self.optimizers:
                optimizer.step()
        for optimizer, scheduler in zip(self.optimizers, self.schedulers, strict=True):
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        experts = balance_experts(
            self.model_parts, self.ctx, self.routed_per_layer, not warming, self.sequences,
            move_biases=self.phases.updates_router_biases(self.step),
        )  # fmt: skip
        skipped = self.ctx.all_reduce_sum(
            torch.tensor(float(self.loader.skipped_records), device=self.device)
        )
        memory = torch.tensor(peak_memory_mib(self.device), dtype=torch.float64)
        self.step += 1
        self.stragglers.add(time.process_time() - cpu_start, data_wait)
        step_time = time.perf_counter() - step_start
        return {
            "step": self.step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": self.tokens_per_step / step_time,
            "mfu": self.mfu.mfu(self.tokens_per_step / step_time),
            "step_time_s": step_time,
            "tokens_seen": self.step * self.tokens_per_step,
            "data_wait_s": data_wait,
            "data_skipped_records": int(skipped.item()),
            "mem_peak_mib": self.ctx.all_reduce_max(memory, None).item(),
            **residual,
            **experts,
            **indexer_stats(self.model_parts, self.ctx, self.has_indexer),
            **self.phases.metrics(self.step - 1),
            **self.guard.applied(self, loss, grad_norm),
            **self.routing.metrics(),
        }

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Accumulate the gradients of one step; returns the summed micro-batch losses."""
        if self.pipeline is not None:  # its schedule runs every micro-batch in one autocast
            summing = self.recipe.parallel.pp_schedule != "zero_bubble"
            kept = step_context(self.weight_casts, self.step_casts, self.device.type,
                                len(micro_batches), summing)  # fmt: skip
            with kept, self.autocast():
                return self.pipeline.train_step(micro_batches, self.device)
        loss_sum = torch.zeros((), device=self.device)
        kind = self.device.type
        with step_context(self.weight_casts, self.step_casts, kind, len(micro_batches)):
            for index, batch in enumerate(micro_batches):
                with self._gradient_sync(index == len(micro_batches) - 1), self.autocast():
                    loss = self._forward(batch.to(self.device))
                with backward_context(self.weight_casts, kind):
                    (loss / self.grad_accum).backward()
                loss_sum += loss.detach()
        return loss_sum

    def reduce_loss(self, loss_sum: torch.Tensor) -> float:
        """A step's mean loss over its micro-batches and the data-parallel ranks."""
        return self.ctx.all_reduce_mean(loss_sum / self.grad_accum).item()

    @torch.no_grad()
    def _eval_record(self) -> dict[str, float]:
        record = {"step": self.step, "eval_loss": self.evaluate()}
        return record | self.engram_stats.take(self.model_parts, self.ctx, self.model_cfg)

    def evaluate(self) -> float:
        """Mean next-token cross-entropy over the same held-out windows every time, across all
        ranks (without the MTP and balance terms that the training objective may add)."""
        self.parallel_model.eval()
        batch_size, per_rank = self.layout.global_batch_size, self.layout.per_rank
        losses = []
        for first in range(0, len(self.heldout), batch_size):
            mine = first + self.ctx.dp_rank * per_rank
            batch = self.build_batch(self.heldout[mine : mine + per_rank]).to(self.device)
            with self.autocast():
                if self.pipeline is not None:
                    losses.append(self.pipeline.evaluate(batch))
                    continue
                losses.append(self._forward(batch, evaluation=True))
        mean = torch.stack(losses).mean()
        return self.ctx.all_reduce_mean(mean).item()

    def _forward(self, batch: Batch, evaluation: bool = False) -> torch.Tensor:
        """The training objective (through the data-parallel wrapper), or in evaluation the
        next-token loss alone."""
        if evaluation:
            kwargs = batch.model_kwargs() | {"next_token_only": True}
            return self.model(batch.inputs, batch.targets, **kwargs)
        return self.parallel_model(batch.inputs, batch.targets, **batch.model_kwargs())

    def _engram_hasher(self, compression: torch.Tensor) -> EngramHasher | None:
        """Engram rows are computed by the data loader when asked for and Engram is on."""
        if not (self.recipe.data.engram_in_loader and self.model_cfg.engram.layers):
            return None
        return EngramHasher(self.model_cfg, compression, self.data.tokenizer.pad_id)

    def _check_residual_constraint(self) -> dict[str, float]:
        stats = residual_stats(self.model_parts, self.ctx)
        check_residual_constraint(stats, self.recipe.model.residual, self.step + 1)
        return stats

    def _clip_gradients(self) -> float:
        max_norm = self.recipe.optim.grad_clip or float("inf")
        params = [p for part in self.model_parts for p in part.parameters()]
        return clip_grad_norm(params, max_norm, self.ctx).item()

    def _gradient_sync(self, sync: bool):
        """Gradients are reduced over data-parallel ranks only on a step's last micro-batch
        (under FSDP after every one with parallel.fsdp_reduce_every_micro_batch)."""
        if isinstance(self.model, FSDPModule):
            every = self.recipe.parallel.fsdp_reduce_every_micro_batch
            self.model.set_requires_gradient_sync(sync or every)
            return nullcontext()
        if sync or not hasattr(self.parallel_model, "no_sync"):
            return nullcontext()
        return self.parallel_model.no_sync()

    def autocast(self):
        enabled = self.recipe.train.mixed_precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the hot ops see (bf16 under autocast): which kernels run depends on it."""
        return torch.bfloat16 if self.recipe.train.mixed_precision == "bf16" else torch.float32

    @property
    def residual_dtype(self) -> torch.dtype:
        """The residual streams' dtype, which autocast leaves alone: FSDP's param_dtype where
        FSDP shards the model, else the parameters' own."""
        if isinstance(self.model, FSDPModule):
            return DTYPES[self.recipe.parallel.param_dtype]
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())
