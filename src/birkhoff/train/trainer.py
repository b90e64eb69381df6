"""The training loop: micro-batches with gradient accumulation, clipping, AdamW, evals, metrics."""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

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
from birkhoff.model import build_model
from birkhoff.model.transformer import Transformer
from birkhoff.parallel import DistributedContext
from birkhoff.parallel.device import peak_memory_mib
from birkhoff.parallel.grad_norm import clip_grad_norm
from birkhoff.parallel.parallelize import parallelize_chunk, wrap_ddp
from birkhoff.parallel.pipeline import Carry, PipelineRunner
from birkhoff.train.checkpointing import checkpoint_manager, resume, save
from birkhoff.train.expert_balance import balance_experts
from birkhoff.train.metrics import MetricLogger
from birkhoff.train.optim import build_optimizer
from birkhoff.train.recipe import TrainRecipe
from birkhoff.train.residual import residual_stats
from birkhoff.train.stop import StopSignal


class ResidualConstraintError(RuntimeError):
    """The mHC residual mapping left the doubly stochastic manifold beyond tolerance."""


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
    ) -> None:
        """`run_dir`: where checkpoints go (recipe `checkpoint.dir` overrides it); without
        one the trainer neither saves nor resumes."""
        self.recipe = recipe
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
        model = build_model(recipe.model, recipe.backend.kernels, compression, tokenizer.pad_id)
        self.model_cfg = model.cfg
        self.hasher = self._engram_hasher(compression)
        self.pipeline = self._pipeline(model.to(device))
        # This rank's share of the model: the whole model, or its pipeline chunks.
        self.model_parts = self.pipeline.chunks if self.pipeline else [model]
        # Called with the trainer once a step's gradients are complete (before clipping).
        self.after_backward: list[Callable[[Trainer], None]] = []
        for part in self.model_parts:
            self.after_backward += parallelize_chunk(part, ctx, recipe.parallel)
        self.model = self.model_parts[0]
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
        self.routed_per_layer = self.tokens_per_step * recipe.model.moe.top_k
        self.step = 0

    def fit(self) -> dict[str, Any]:
        """Train for `train.steps` steps; returns the run summary (losses, throughput)."""
        cfg = self.recipe.train
        if self.checkpoints is not None:
            resume(self, self.checkpoints)
        first_loss = last_loss = float("nan")
        start, first_step = time.perf_counter(), self.step
        with StopSignal() as stop:
            while self.step < cfg.steps:
                record = self.train_step()
                first_loss = record["loss"] if self.step == first_step + 1 else first_loss
                last_loss = record["loss"]
                stopping = stop.requested(self.ctx)
                record.update(self._checkpoint(self.step == cfg.steps or stopping))
                self.metrics.log(record)
                if stopping:
                    self._announce_stop(stop.agreed)
                    break
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.metrics.log({"step": self.step, "eval_loss": self.evaluate()})
        heldout_loss = self.evaluate()  # overlaps a background checkpoint write
        self.metrics.log({"step": self.step, "eval_loss": heldout_loss})
        self._finish_checkpoints()
        elapsed = time.perf_counter() - start
        return {
            "steps": self.step,
            "first_loss": first_loss,
            "last_loss": last_loss,
            "heldout_loss": heldout_loss,
            "tokens": self.step * self.tokens_per_step,
            "seconds": elapsed,
            "tokens_per_s": (self.step - first_step) * self.tokens_per_step / elapsed,
            "world_size": self.ctx.world_size,
            "stopped_by": signal.Signals(stop.agreed).name if stop.agreed else None,
        }

    def _checkpoint(self, last: bool) -> dict[str, float]:
        """Save if one is due; the metrics: seconds the step was blocked, and the whole
        save's seconds once a (background) save is complete."""
        if self.checkpoints is None:
            return {}
        timings = {}
        if self.checkpoints.due(self.step, last):
            timings["checkpoint_blocked_s"] = save(self, self.checkpoints)
        written = self.checkpoints.completed()
        if written is not None:
            timings["checkpoint_write_s"] = written
        return timings

    def _finish_checkpoints(self) -> None:
        if self.checkpoints is None:
            return
        written = self.checkpoints.completed(wait=True)
        if written is not None:
            self.metrics.log({"step": self.step, "checkpoint_write_s": written})
        self.checkpoints.close()

    def _announce_stop(self, signal_number: int | None) -> None:
        if self.ctx.is_main:
            name = signal.Signals(signal_number).name if signal_number else "a signal"
            where = "a checkpoint was written" if self.checkpoints else "no checkpoint dir"
            print(f"birkhoff: {name} on a rank: stopped after step {self.step}; {where}")

    def train_step(self) -> dict[str, Any]:
        step_start = time.perf_counter()
        self.parallel_model.train()
        micro_batches = self.loader.next_batch()
        data_wait = time.perf_counter() - step_start
        loss_sum = self.forward_backward(micro_batches)
        for hook in self.after_backward:
            hook(self)
        residual = self._check_residual_constraint()
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"step {self.step + 1}: gradient norm is {grad_norm}")
        lr = self.schedulers[0].get_last_lr()[0]
        for optimizer, scheduler in zip(self.optimizers, self.schedulers, strict=True):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        experts = balance_experts(self.model_parts, self.ctx, self.routed_per_layer)
        loss = self.reduce_loss(loss_sum)
        skipped = self.ctx.all_reduce_sum(
            torch.tensor(float(self.loader.skipped_records), device=self.device)
        )
        memory = torch.tensor(peak_memory_mib(self.device), dtype=torch.float64)
        self.step += 1
        step_time = time.perf_counter() - step_start
        return {
            "step": self.step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": self.tokens_per_step / step_time,
            "step_time_s": step_time,
            "tokens_seen": self.step * self.tokens_per_step,
            "data_wait_s": data_wait,
            "data_skipped_records": int(skipped.item()),
            "mem_peak_mib": self.ctx.all_reduce_max(memory, None).item(),
            **residual,
            **experts,
        }

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Accumulate the gradients of one step; returns the summed micro-batch losses."""
        if self.pipeline is not None:
            with self._autocast():
                return self.pipeline.train_step(micro_batches, self.device)
        loss_sum = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            with self._gradient_sync(index == len(micro_batches) - 1), self._autocast():
                loss = self._forward(batch.to(self.device), with_targets=True)
            (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
        return loss_sum

    def reduce_loss(self, loss_sum: torch.Tensor) -> float:
        """A step's mean loss over its micro-batches and the data-parallel ranks."""
        return self.ctx.all_reduce_mean(loss_sum / self.grad_accum).item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy over the same held-out windows every time, across all
        ranks (without the MTP and balance terms that the training objective may add)."""
        self.parallel_model.eval()
        batch_size, per_rank = self.layout.global_batch_size, self.layout.per_rank
        losses = []
        for first in range(0, len(self.heldout), batch_size):
            mine = first + self.ctx.dp_rank * per_rank
            batch = self.build_batch(self.heldout[mine : mine + per_rank]).to(self.device)
            with self._autocast():
                if self.pipeline is not None:
                    losses.append(self.pipeline.evaluate(batch))
                    continue
                logits = self._forward(batch, with_targets=False)
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten()))
        mean = torch.stack(losses).mean()
        return self.ctx.all_reduce_mean(mean).item()

    def _forward(self, batch: Batch, with_targets: bool) -> torch.Tensor:
        """The loss (training: through the data-parallel wrapper) or the logits (evaluation)."""
        if with_targets:
            return self.parallel_model(batch.inputs, batch.targets, **batch.model_kwargs())
        return self.model(batch.inputs, **batch.model_kwargs())

    def _engram_hasher(self, compression: torch.Tensor) -> EngramHasher | None:
        """Engram rows are computed by the data loader when asked for and Engram is on."""
        if not (self.recipe.data.engram_in_loader and self.model_cfg.engram.layers):
            return None
        return EngramHasher(self.model_cfg, compression, self.data.tokenizer.pad_id)

    def _pipeline(self, model: Transformer) -> PipelineRunner | None:
        if self.ctx.size("pp") == 1:
            return None
        carry = Carry(
            has_positions=self.recipe.data.document_mask,
            row_layers=tuple(sorted(self.model_cfg.engram.layers)) if self.hasher else (),
            mtp=model.uses_mtp,
        )
        return PipelineRunner(model, self.ctx, self.recipe.parallel, carry, self.grad_accum)

    def _check_residual_constraint(self) -> dict[str, float]:
        """mHC's H_res must stay (nearly) doubly stochastic: fail the step before its update."""
        stats = residual_stats(self.model_parts, self.ctx)
        residual_cfg = self.recipe.model.residual
        if residual_cfg.mode == "mhc":
            worst = max(stats["mhc_row_dev"], stats["mhc_col_dev"])
            if worst > residual_cfg.tolerance:
                raise ResidualConstraintError(
                    f"step {self.step + 1}: an mHC H_res row/column sum is off by {worst:.3g} "
                    f"(rows {stats['mhc_row_dev']:.3g}, columns {stats['mhc_col_dev']:.3g}), "
                    f"above model.residual.tolerance={residual_cfg.tolerance}; raise "
                    "model.residual.sinkhorn_iters or lower the learning rate"
                )
        return stats

    def _clip_gradients(self) -> float:
        max_norm = self.recipe.optim.grad_clip or float("inf")
        params = [p for part in self.model_parts for p in part.parameters()]
        return clip_grad_norm(params, max_norm, self.ctx).item()

    def _gradient_sync(self, sync: bool):
        """Gradients are reduced over data-parallel ranks only on a step's last micro-batch."""
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(sync)
            return nullcontext()
        if sync or not hasattr(self.parallel_model, "no_sync"):
            return nullcontext()
        return self.parallel_model.no_sync()

    def _autocast(self):
        enabled = self.recipe.train.mixed_precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)
