"""What a checkpoint holds, as torch.distributed.checkpoint sees it.

Tensors (model parameters and buffers such as the MoE balancing biases, AdamW moments and
steps) go through DCP, keyed by the unwrapped model's parameter names, so any layout can load
them (DCP reshards). Only tensors are saved: DCP would pickle anything else, and unpickle it on
load. Non-tensor optimizer entries (the param-group settings) come from the recipe instead;
the learning rate follows from the step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass
class TrainingState:
    """The model parts of this rank (the model, or its pipeline chunks) and one optimizer and
    LR scheduler per part."""

    parts: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[Any]

    def full_state(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(model state, flattened optimizer state) per part."""
        return [
            (
                get_model_state_dict(part, options=OPTIONS),
                get_optimizer_state_dict(part, optimizer, options=OPTIONS),
            )
            for part, optimizer in zip(self.parts, self.optimizers, strict=True)
        ]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything DCP saves or loads: model.<name> and optim.<key> tensors."""
        flat: dict[str, torch.Tensor] = {}
        for model_state, optim_state in self.full_state():
            flat.update(_tensors("model.", model_state))
            flat.update(_tensors("optim.", optim_state))
        return flat

    def load_tensors(self, loaded: dict[str, torch.Tensor]) -> None:
        """Put tensors read by DCP (keys as in `tensors()`) back into the parts."""
        for part, optimizer, (model_state, optim_state) in zip(
            self.parts, self.optimizers, self.full_state(), strict=True
        ):
            model_state.update(_strip("model.", loaded, model_state))
            optim_state.update(_strip("optim.", loaded, optim_state))
            set_model_state_dict(part, model_state, options=OPTIONS)
            set_optimizer_state_dict(part, optimizer, optim_state, options=OPTIONS)

    def restore_schedule(self, step: int) -> None:
        """Put every LR scheduler (and its optimizer's learning rates) at `step`. The
        schedule is a function of the step alone, so nothing else is saved for it, and a
        layout with other parameter groups per part resumes the same way."""
        for scheduler in self.schedulers:
            scheduler.last_epoch = step - 1
            scheduler.step()


def _tensors(prefix: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip(prefix: str, loaded: dict[str, torch.Tensor], like: dict[str, Any]) -> dict:
    return {k: loaded[prefix + k] for k in like if prefix + k in loaded}


def rng_states() -> dict[str, Any]:
    """This process's random number generators (torch, numpy, python)."""
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    np.random.set_state(states["numpy"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
