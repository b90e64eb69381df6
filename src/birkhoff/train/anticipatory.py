"""Anticipatory Routing (DeepSeek-V4 §4.2.3): the experts of step t are chosen with the
parameters of step t - dt.

At step t, before its own forward, the trainer fetches the batch of step t + dt (the loader
is deterministic, so looking ahead changes no data) and runs a no-grad forward over it in eval
mode (no balancing counts or statistics) through every block, the MTP depths' included, but
not the head (`routes_only`), recording every MoE layer's chosen experts per micro-batch. dt
steps later that batch is trained on, and every MoE layer uses the recorded experts instead
of its own top-k. The gate values are the current parameters' scores of those
experts, so the router still learns from every step; the report fixes only the indices, and
taking the gates from the stale parameters would give the router no gradient for the step.

The first dt steps after switching on have no recorded experts yet and route as usual. A
checkpoint holds the loader position before the look-ahead batches and their recorded experts
(per rank), so resuming mid-window gives the same steps.

With pipeline parallelism the look-ahead forward runs stage by stage (each rank records the
MoE layers it holds, the MTP depths included), and each stage's training forwards take the
plans of the step's micro-batches in order, as the schedule runs them; the plans travel in
each forward's context, so a checkpointed block recomputes with the same experts.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from birkhoff.data import Batch, TrainLoader
from birkhoff.model.moe import MoE
from birkhoff.model.transformer import Block, Transformer
from birkhoff.train.stability_config import AnticipatoryConfig

if TYPE_CHECKING:
    from birkhoff.train.trainer import Trainer

# per micro-batch, per MoE layer (by its index): (B, T', k) expert ids
Routes = list[dict[int, torch.Tensor]]


@dataclass
class LookAhead:
    """A fetched batch, the loader's state before it was fetched, its recorded experts."""

    micro_batches: list[Batch]
    loader_state: dict[str, Any]
    routes: Routes | None = None


@dataclass
class AnticipatoryRouting:
    cfg: AnticipatoryConfig
    layers: dict[int, MoE]  # this rank's MoE layers by index (MTP depths after the main ones)
    parts: list[Transformer]
    queue: deque[LookAhead] = field(default_factory=deque)
    remaining: int | None = None  # steps left with look-ahead on (None: indefinitely)
    active: bool = False
    saved_routes: list[Routes | None] = field(default_factory=list)  # from a checkpoint
    seconds: float = 0.0  # the look-ahead forward's time in the current step
    planned: Routes | None = None  # the current step's recorded experts

    @classmethod
    def of(cls, cfg: AnticipatoryConfig, parts: list[Transformer]) -> AnticipatoryRouting:
        blocks = [m for part in parts for m in part.modules() if isinstance(m, Block)]
        layers = {b.layer: b.ffn for b in blocks if isinstance(b.ffn, MoE)}
        return cls(cfg, layers, list(parts), active=cfg.mode == "always")

    def spike_rollback(self, step: int) -> None:
        """mode=spike: look ahead for the next `steps` steps. The experts already recorded
        came from the parameters rolled back from: they are dropped (those steps route as
        usual)."""
        for item in self.queue:
            item.routes = None
        if self.cfg.mode == "spike":
            self.active, self.remaining = True, self.cfg.steps

    def next_batch(self, trainer: Trainer) -> list[Batch]:
        """The micro-batches of this step; their recorded experts become the plan."""
        loader, self.seconds = trainer.loader, 0.0
        while self.saved_routes:  # the look-ahead batches a checkpoint was saved with
            self._fetch(loader, self.saved_routes.pop(0))
        if self.active:
            while len(self.queue) < self.cfg.lookahead:  # just switched on: no plan for these
                self._fetch(loader, None)
            self._fetch(loader, None)
            newest, recording = self.queue[-1], time.perf_counter()
            newest.routes = self._record(trainer, newest.micro_batches)
            self.seconds = time.perf_counter() - recording
        if not self.queue:
            self.planned = None
            return loader.next_batch()
        head = self.queue.popleft()
        self.planned = head.routes
        for part in self.parts:  # its training forwards take them in turn
            part.planned_routes, part.planned_forwards = self.planned, 0
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:  # the queued batches drain with their plans
                self.active, self.remaining = False, None
        return head.micro_batches

    def _fetch(self, loader: TrainLoader, routes: Routes | None) -> None:
        state = loader.state_dict()
        self.queue.append(LookAhead(loader.next_batch(), state, routes))

    @torch.no_grad()
    def _record(self, trainer: Trainer, micro_batches: list[Batch]) -> Routes:
        """Every micro-batch's experts, by a forward in eval mode (no balancing counts, no
        statistics; routing is the same), the MTP depths included, without the head."""
        routes: Routes = []
        try:
            for batch in micro_batches:
                for layer in self.layers.values():
                    layer.route_record = []
                with trainer.autocast():
                    batch = batch.to(trainer.device)
                    if trainer.pipeline is not None:  # stage by stage
                        trainer.pipeline.evaluate(batch, routes_only=True)
                    else:
                        trainer.model.eval()
                        kwargs = batch.model_kwargs()
                        trainer.model(batch.inputs, batch.targets, **kwargs, routes_only=True)
                rows = batch.inputs.shape[0]
                routes.append({index: self._one_route(layer).view(rows, -1, layer.cfg.top_k)
                               for index, layer in self.layers.items()})  # fmt: skip
        finally:
            for layer in self.layers.values():
                layer.route_record = None
            if trainer.pipeline is None:  # (the pipeline puts its stages back itself)
                trainer.model.train()
        return routes

    @staticmethod
    def _one_route(layer: MoE) -> torch.Tensor:
        if len(layer.route_record) != 1:
            raise RuntimeError(f"a MoE layer routed {len(layer.route_record)} times in a forward")
        return layer.route_record[0]

    def clear(self) -> None:
        """After the step: no plan until the next one sets it."""
        for part in self.parts:
            part.planned_routes = None

    def metrics(self) -> dict[str, float]:
        if self.cfg.mode == "off":
            return {}
        return {"anticipatory_routing": float(self.planned is not None),
                "anticipatory_s": self.seconds}  # fmt: skip

    def loader_state(self, loader: TrainLoader) -> dict[str, Any]:
        """The loader's state at the first batch not yet trained on."""
        return self.queue[0].loader_state if self.queue else loader.state_dict()

    def state_dict(self) -> dict[str, Any]:
        routes = [
            None
            if item.routes is None
            else [{index: r.cpu().numpy() for index, r in mb.items()} for mb in item.routes]
            for item in self.queue
        ]
        return {"active": self.active, "remaining": self.remaining, "routes": routes}

    def load_state_dict(
        self, state: dict[str, Any] | None, same_layout: bool, device: torch.device
    ) -> None:
        self.queue.clear()
        if state is None:  # a checkpoint from before Anticipatory Routing, or with it off
            return
        self.active, self.remaining = state["active"], state["remaining"]
        if self.cfg.mode == "always":
            self.active, self.remaining = True, None
        if not same_layout and any(r is not None for r in state["routes"]):
            print("birkhoff: the checkpoint's recorded experts belong to another layout; the "
                  "next look-ahead steps route as usual", file=sys.stderr, flush=True)  # fmt: skip
            return
        self.saved_routes = [
            None if r is None else [self._routes_of(mb, device) for mb in r]
            for r in state["routes"]
        ]

    def _routes_of(self, saved: dict | list, device: torch.device) -> dict[int, torch.Tensor]:
        """A micro-batch's saved experts, by layer index (JSON made the keys strings; a
        checkpoint before pipeline support listed them in layer order, each (tokens, k): the
        same as (1, tokens, k) to the layers)."""
        if isinstance(saved, list):
            saved = dict(zip(sorted(self.layers), saved, strict=True))
        return {int(i): torch.from_numpy(np.asarray(x)).to(device) for i, x in saved.items()}
