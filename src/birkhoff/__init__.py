"""birkhoff: pretraining DeepSeek-V4-style language models (MoE + Engram + mHC)."""

from birkhoff.rank_children import leave_rank_process_group

__version__ = "0.1.0"

# First thing in a process a rank spawned (DCP's checkpoint process): see rank_children.py.
leave_rank_process_group()
