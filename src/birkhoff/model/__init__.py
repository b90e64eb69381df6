"""Model code: plain PyTorch modules built from config dataclasses, no process-group logic."""

from birkhoff.model.config import ModelConfig
from birkhoff.model.transformer import Transformer, build_model

__all__ = ["ModelConfig", "Transformer", "build_model"]
