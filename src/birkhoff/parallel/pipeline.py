"""Pipeline parallelism with torch.distributed.pipelining.

The model is cut by layers into pp x pp_stages_per_rank stages; rank r of the `pp` dimension
holds stages r, r + pp, ... (looped placement, which 1F1B, interleaved 1F1B and the
interleaved zero-bubble schedule all use). A stage is the built model with the other stages'
layers removed, so parameter names stay those of the whole model (checkpoints reshard across
pp). Between stages travel the n mHC streams (B, T, n, C), the token ids (Engram hashes
them), the targets, the optional document positions and Engram rows, and Emb(targets) when
MTP is on: the embedding lives on stage 0 and MTP on the last stage, where the head and the
loss are. Every stage returns a tuple; the last returns the micro-batch loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from birkhoff.data.batch import Batch
from birkhoff.model.init import constant
from birkhoff.model.transformer import Transformer
from birkhoff.parallel.config import ParallelConfig

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}


@dataclass(frozen=True)
class Carry:
    """What travels between stages, besides the residual: fixed for the whole run."""

    has_positions: bool
    row_layers: tuple[int, ...]  # Engram layers whose rows the loader computed
    mtp: bool

    def stage_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Stage 0's arguments for a batch."""
        extras = (batch.positions,) if self.has_positions else ()
        rows = tuple(batch.engram_rows[layer] for layer in self.row_layers)
        return (batch.inputs, batch.targets, *extras, *rows)

    def unpack(self, extras: tuple[torch.Tensor, ...]) -> tuple:
        positions = extras[0] if self.has_positions else None
        rows = extras[int(self.has_positions) :]
        return positions, dict(zip(self.row_layers, rows, strict=True)) or None


class PipelineChunk(Transformer):
    """A Transformer holding only some layers (set as the class of a pruned copy)."""

    carry: Carry
    is_first: bool
    is_last: bool
    routes_only: bool = False  # Anticipatory Routing's look-ahead: every MoE layer, no head

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.is_first:
            tokens, targets, *rest = args
            x = self.embed(tokens)
            target_embeddings = self.embedding(targets) if self.carry.mtp else None
        else:
            x, tokens, targets, *rest = args
            target_embeddings = rest.pop() if self.carry.mtp else None
        positions, rows = self.carry.unpack(tuple(rest))
        ctx = self.context(tokens.shape[1], positions, rows)
        x, aux_losses = self.run_blocks(x, tokens, ctx)
        aux = sum(aux_losses) if aux_losses and self.training else None
        if aux is not None:
            self.aux_loss_sum += aux.detach()
        if self.is_last:
            if self.routes_only:
                return self.route_mtp_depths(x, targets, ctx, target_embeddings)
            if not self.training:
                target_embeddings = None  # evaluation: next-token loss only
            loss = self.output_loss(x, targets, ctx, target_embeddings)
            return loss if aux is None else loss + aux
        if aux is not None:
            x = _WithLoss.apply(x, aux)
        sent = (x.contiguous(), tokens, targets, *rest)
        return sent + ((target_embeddings.contiguous(),) if self.carry.mtp else ())


class _WithLoss(torch.autograd.Function):
    """Identity on the residual whose backward also differentiates `loss` (as if added to the
    objective): a stage's MoE balance losses reach backward without travelling to the last
    stage (DeepSeek-V3's AddAuxiliaryLoss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad.device)


def stage_ids(pp_rank: int, cfg: ParallelConfig) -> list[int]:
    return [pp_rank + chunk * cfg.pp for chunk in range(cfg.pp_stages_per_rank)]


# The Transformer's children; a chunk takes those of its stage from the built model itself.
PARTS = ("embedding", "blocks", "readout", "norm", "head", "mtp")


def cut_chunk(model: Transformer, stage: int, cfg: ParallelConfig, carry: Carry) -> PipelineChunk:
    """Stage `stage` of `model`: its layers, and the embedding on the first stage, the readout,
    norm, head and MTP on the last. The modules are the model's own, moved, not copied: once
    this rank's chunks are cut and the model dropped, the other stages' layers are freed (a
    copy would hold the whole model twice while cutting)."""
    layers = cfg.stage_layers(model.cfg.num_layers)
    start = sum(layers[:stage])
    # (a plain residual has no readout: an attribute set to None, not a module)
    parts = {name: model._modules[name] for name in PARTS if name in model._modules}
    model._modules.update(dict.fromkeys(parts))
    try:
        chunk = copy.deepcopy(model)  # the shell: settings and RoPE tables, fresh hook dicts
    finally:
        model._modules.update(parts)
    chunk.__class__ = PipelineChunk
    chunk.carry, chunk.is_first, chunk.is_last = carry, stage == 0, stage == cfg.num_stages - 1
    chunk.blocks = nn.ModuleDict(
        {str(i): model.blocks[str(i)] for i in range(start, start + layers[stage])}
    )
    if chunk.is_first:
        chunk.embedding = model.embedding
    if chunk.is_last:
        chunk.readout, chunk.norm, chunk.head, chunk.mtp = (
            model.readout,
            model.norm,
            model.head,
            model.mtp,
        )
    # MoE balance losses of this stage's micro-batches, for the reported loss (detached).
    constant(chunk, "aux_loss_sum", lambda: torch.zeros(()), buffer=True, persistent=False)
    return chunk


def passed_args(carry: Carry, micro: Batch, model: Transformer) -> tuple[torch.Tensor, ...]:
    """Templates of what a stage passes to the next for a micro-batch like `micro` (`model`:
    any chunk; only its settings are read)."""
    tokens, targets, *extras = carry.stage_inputs(micro)
    batch, seq = tokens.shape
    hidden, device = model.cfg.hidden_size, tokens.device
    stream_shape = (
        (batch, seq, model.streams, hidden) if model.has_streams else (batch, seq, hidden)
    )
    x = torch.empty(stream_shape, device=device, requires_grad=True)
    mtp = (torch.empty(batch, seq, hidden, device=device, requires_grad=True),)
    return (x, tokens, targets, *extras) + (mtp if carry.mtp else ())


def example_args(
    chunk: PipelineChunk, micro: Batch
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(input_args, output_args) of a stage for one micro-batch, for shape inference."""
    passed = passed_args(chunk.carry, micro, chunk)
    stage_in = chunk.carry.stage_inputs(micro) if chunk.is_first else passed
    stage_out = (torch.empty((), device=micro.inputs.device),) if chunk.is_last else passed
    return stage_in, stage_out


def build_schedule(
    chunks: list[PipelineChunk],
    stages: list[int],
    cfg: ParallelConfig,
    micro: Batch,
    micro_batches: int,
    group,
):
    """The pipeline schedule over this rank's chunks."""
    device = micro.inputs.device
    pipeline_stages = []
    for chunk, stage in zip(chunks, stages, strict=True):
        stage_in, stage_out = example_args(chunk, micro)
        pipeline_stages.append(
            PipelineStage(
                chunk,
                stage,
                cfg.num_stages,
                device,
                input_args=stage_in,
                output_args=stage_out,
                group=group,
            )
        )
    schedule_class = SCHEDULES[cfg.pp_schedule]
    loss_fn = _stage_loss
    if cfg.pp_stages_per_rank == 1:
        return schedule_class(pipeline_stages[0], micro_batches, loss_fn=loss_fn)
    return schedule_class(pipeline_stages, micro_batches, loss_fn=loss_fn)


def _stage_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage already returns its micro-batch loss."""
    return output


class PipelineRunner:
    """This rank's chunks and their schedule: trains a step's micro-batches and evaluates."""

    def __init__(
        self,
        model: Transformer,
        ctx,
        cfg: ParallelConfig,
        carry: Carry,
        micro_batches: int,
    ) -> None:
        """Keeps only this rank's chunks: the caller's `model` may be dropped after this."""
        self.ctx, self.cfg, self.carry = ctx, cfg, carry
        self.pp_rank, self.pp = ctx.local_rank_in("pp"), ctx.size("pp")
        self.stages = stage_ids(self.pp_rank, cfg)
        self.chunks = [cut_chunk(model, stage, cfg, carry) for stage in self.stages]
        self.micro_batches = micro_batches
        self.schedule = None  # built at the first step, from a real micro-batch's shapes

    def train_step(self, micro_batches: list[Batch], device: torch.device) -> torch.Tensor:
        """Forward and backward of a step; returns the summed micro-batch losses (all ranks)."""
        batch = concat(micro_batches).to(device)
        if self.schedule is None:
            micro = micro_batches[0].to(device)
            group = self.ctx.group("pp")
            self.schedule = build_schedule(
                self.chunks, self.stages, self.cfg, micro, self.micro_batches, group
            )
        args = self.carry.stage_inputs(batch) if self.pp_rank == 0 else ()
        losses: list[torch.Tensor] = []
        if self.pp_rank == self.pp - 1:
            self.schedule.step(*args, target=batch.targets, losses=losses, return_outputs=False)
        else:
            self.schedule.step(*args, return_outputs=False)
        loss_sum = torch.stack(losses).sum().detach() if losses else torch.zeros((), device=device)
        for chunk in self.chunks:  # balance losses of the other stages, as one process reports
            if not chunk.is_last:
                loss_sum += chunk.aux_loss_sum
            chunk.aux_loss_sum.zero_()
        return self.ctx.all_reduce_sum(loss_sum, "pp")

    @torch.no_grad()
    def evaluate(self, batch: Batch, routes_only: bool = False) -> torch.Tensor:
        """The next-token loss of `batch`, passing activations stage by stage (every rank);
        `routes_only`: zero after every MoE layer ran, the MTP depths' too, and no head
        (Anticipatory Routing records their experts)."""
        group = self.ctx.group("pp")
        carried: tuple[torch.Tensor, ...] = self.carry.stage_inputs(batch)
        loss = torch.zeros((), device=batch.inputs.device)
        for stage in range(self.cfg.num_stages):
            owner = stage % self.pp
            if owner == self.pp_rank:
                chunk = self.chunks[self.stages.index(stage)]
                if stage > 0:
                    templates = passed_args(self.carry, batch, chunk)
                    carried = _receive(templates, (owner - 1) % self.pp, group)
                chunk.eval()
                chunk.routes_only = routes_only
                try:
                    out = chunk(*carried)
                finally:  # back to training and full forwards, even after a failed one
                    chunk.train()
                    chunk.routes_only = False
                if chunk.is_last:
                    loss = out.float()
                else:
                    _send(out, (owner + 1) % self.pp, group)
        return self.ctx.all_reduce_sum(loss, "pp")


def concat(micro_batches: list[Batch]) -> Batch:
    """One batch from a step's micro-batches (the schedule splits it again)."""
    first = micro_batches[0]
    rows = first.engram_rows

    def cat(get):
        return torch.cat([get(m) for m in micro_batches])

    return Batch(
        inputs=cat(lambda m: m.inputs),
        targets=cat(lambda m: m.targets),
        positions=None if first.positions is None else cat(lambda m: m.positions),
        engram_rows=None
        if rows is None
        else {k: cat(lambda m, k=k: m.engram_rows[k]) for k in rows},
    )


def _receive(templates: tuple[torch.Tensor, ...], source: int, group) -> tuple[torch.Tensor, ...]:
    received = []
    for template in templates:
        buffer = torch.empty(template.shape, dtype=template.dtype, device=template.device)
        dist.recv(buffer, group=group, group_src=source)
        received.append(buffer)
    return tuple(received)


def _send(tensors: tuple[torch.Tensor, ...], destination: int, group) -> None:
    for tensor in tensors:
        dist.send(tensor.contiguous(), group=group, group_dst=destination)
