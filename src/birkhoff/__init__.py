"""birkhoff: pretraining DeepSeek-V4-style language models (MoE + Engram + mHC)."""

__version__ = "0.1.0"
