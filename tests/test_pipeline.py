"""A pipeline rank holds its own stages only: cutting moves the built model's modules into this
rank's chunks, and nothing else keeps the model (no copy, no reference)."""

from __future__ import annotations

import gc
import weakref

import pytest

from birkhoff.model import build_model
from birkhoff.model.config import EngramConfig, MoEConfig, MTPConfig
from birkhoff.parallel.config import ParallelConfig
from birkhoff.parallel.pipeline import Carry, PipelineRunner
from conftest import small_model


class PipelineCoordinates:
    """The two things PipelineRunner asks of the distributed context."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.pp = rank, size

    def local_rank_in(self, dim: str) -> int:
        assert dim == "pp"
        return self.rank

    def size(self, dim: str) -> int:
        assert dim == "pp"
        return self.pp


CONFIG = small_model(
    num_layers=4,
    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=16),
    engram=EngramConfig(layers=[1], table_size=101, embed_dim=8),
    mtp=MTPConfig(depth=1),
)
# What each stage holds, written out: layers split evenly, the embedding on the first stage,
# the stream readout, final norm, head and MTP depth on the last.
FIRST = ("embedding.", "blocks.0.", "blocks.1.")
LAST = ("blocks.2.", "blocks.3.", "readout.", "norm.", "head.", "mtp.")


@pytest.mark.parametrize(
    ("pp", "stages_per_rank", "rank", "held"),
    [
        (2, 1, 0, FIRST),
        (2, 1, 1, LAST),
        # interleaved, 4 stages of one layer: rank 0 holds stages 0 and 2
        (2, 2, 0, ("embedding.", "blocks.0.", "blocks.2.")),
    ],
)
def test_a_pipeline_rank_holds_its_stages_and_nothing_else(pp, stages_per_rank, rank, held):
    model = build_model(CONFIG)
    every = {name: weakref.ref(param) for name, param in model.named_parameters()}
    schedule = "1f1b" if stages_per_rank == 1 else "interleaved_1f1b"
    parallel = ParallelConfig(pp=pp, pp_stages_per_rank=stages_per_rank, pp_schedule=schedule)
    carry = Carry(has_positions=False, row_layers=(), mtp=True)
    runner = PipelineRunner(model, PipelineCoordinates(rank, pp), parallel, carry, 2)
    del model
    gc.collect()
    alive = {name for name, ref in every.items() if ref() is not None}
    chunks = {name for chunk in runner.chunks for name, _ in chunk.named_parameters()}
    assert alive == chunks  # the chunks' parameters are all this rank still holds
    assert chunks == {name for name in every if name.startswith(held)}
