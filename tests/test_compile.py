"""train.compile: torch.compile per transformer block (parallel/compile.py), against the same
run in eager mode and the ops it needed against loops (compiled multi-rank layouts:
test_parallel.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from test_parallel import AOT_EAGER, TWO_LAYERS
from test_parallel import MODEL as PARALLEL_MODEL
from test_train import read_metrics, train_in_process
from torch.distributed.checkpoint import FileSystemReader

from birkhoff import kernels

STEPS = ["train.steps=3", "train.eval_every=3", "optim.warmup_steps=1"]
SELECTIVE_AC = "parallel.activation_checkpoint=selective"
# test_parallel's model cut to two layers and its MTP depth (3 blocks), as its compiled
# layouts; aot_eager: see there.
MODEL = [*PARALLEL_MODEL, *TWO_LAYERS]
# What blocks record: MoE loads, mHC deviations, the indexer's KL and recall (and at the
# evaluations, Engram's gates and rows).
STATS = ("moe_load_max_over_mean", "mhc_col_dev", "indexer_kl", "indexer_recall")


def saved_names(run_dir: Path) -> set[str]:
    step = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return set(FileSystemReader(step).read_metadata().state_dict_metadata)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_grouped_gemm_compiles_in_float32_and_matches_a_loop(backend, tmp_path, monkeypatch):
    """F.grouped_mm's traced shape function takes bfloat16 only; compiled float32 MoE blocks
    go through kernels/opaque_grouped_mm.py. Forward and both gradients against a float64
    per-expert loop, with an empty expert, without a graph break (fullgraph), and with
    inductor's generated code around the operator (the default train.compile_backend). With
    an empty inductor cache: a cached graph would keep an older version of the operator."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 4])
    x = torch.randn(int(counts.sum()), 8, requires_grad=True)
    w = torch.randn(4, 8, 12, requires_grad=True)
    gemm = torch.compile(kernels.get("grouped_gemm"), backend=backend, fullgraph=True)
    out = gemm(x, w, counts.cumsum(0, dtype=torch.int32))
    grad = torch.randn_like(out)
    out.backward(grad)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ends = counts.cumsum(0).tolist()
    rows = zip([0, *ends[:-1]], ends, strict=True)
    expected = torch.cat([x64[start:end] @ w64[i] for i, (start, end) in enumerate(rows)])
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_moe_permute_counts_compile_without_a_break():
    """Tokens per expert by scatter-add (bincount's value-dependent length breaks the block's
    graph once it feeds the grouped GEMM: the whole-run test below catches that), compiled,
    against a Counter; an expert nobody picked counts 0."""
    ids = torch.tensor([[0, 2], [2, 3], [0, 2], [3, 0]])
    permute = torch.compile(kernels.get("moe_permute"), backend="aot_eager", fullgraph=True)
    _, order, counts = permute(torch.randn(4, 8), ids, 5)
    seen = Counter(ids.flatten().tolist())
    assert counts.tolist() == [seen[e] for e in range(5)]
    assert ids.flatten()[order].tolist() == sorted(ids.flatten().tolist())


@pytest.mark.slow
def test_a_compiled_run_trains_as_the_eager_one(tmp_path, capsys):
    """Every block compiled whole (no graph break), inside selective activation
    checkpointing (dynamo traces the checkpointed region, AOTAutograd tags the ops our policy
    saves; the recompute is in the backward graph; full checkpointing: the fsdp layout
    below): the eager run's losses, held-out loss and statistics (a compiled block that
    skipped them as a recompute would lose them); the checkpoint holds the same names."""
    train_in_process(tmp_path / "eager", [*MODEL, *STEPS, SELECTIVE_AC])
    compiled = train_in_process(tmp_path / "compiled", [*MODEL, *STEPS, SELECTIVE_AC, *AOT_EAGER])
    out = capsys.readouterr().out
    assert "compile: torch.compile on 3 blocks; the first step compiles them" in out
    assert compiled["compile"]["blocks"] == 3 and compiled["compile"]["graphs"] >= 3
    assert compiled["compile"]["graph_breaks"] == 0
    assert "3 blocks (aot_eager)" in out and "0 graph breaks" in out
    got, _ = read_metrics(tmp_path / "compiled")
    expected, _ = read_metrics(tmp_path / "eager")
    for key in ("loss", *STATS):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in expected], abs=1e-5), key
    _, got_eval = read_metrics(tmp_path / "compiled")
    _, expected_eval = read_metrics(tmp_path / "eager")
    for key in ("eval_loss", "engram_gate_mean", "engram_rows_touched"):
        assert got_eval[-1][key] == pytest.approx(expected_eval[-1][key], abs=1e-5), key
    assert saved_names(tmp_path / "compiled") == saved_names(tmp_path / "eager")


def test_identical_blocks_share_their_compiled_code():
    """Blocks that differ only in their index compile once: a block that read its own index
    (to look up planned routes or Engram rows) made dynamo guard on it and compile every
    block anew (small's 12 blocks cold-compiled for more than 4 minutes on an H200). Four
    MoE blocks must add no graph to two."""
    from dataclasses import replace

    from torch._dynamo.utils import counters

    from birkhoff.model import build_model
    from birkhoff.parallel.compile import CompileStats, compile_blocks
    from birkhoff.parallel.parallelize import block_slots
    from conftest import small_model

    def graphs(layers: int) -> int:
        torch._dynamo.reset()
        counters.clear()
        cfg = small_model(num_layers=layers)
        cfg = replace(cfg, moe=replace(cfg.moe, num_experts=4, top_k=2, first_k_dense=0))
        net = build_model(cfg, seed=0)
        compile_blocks(block_slots(net), "aot_eager")
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=generator)
        for _ in range(2):
            net(tokens[:, :-1], tokens[:, 1:]).backward()
        return CompileStats.now().graphs

    two, four = graphs(2), graphs(4)
    assert two > 0 and four == two


def test_micro_batches_do_not_recompile_a_block():
    """What a block records is a tensor updated in place: the indexer's statistics, a list
    that grew by one entry per training forward, made dynamo guard on its length and compile
    a CSA block anew for every micro-batch (in a loop that never took them, every step: a
    compiled `tiny` ran 40x slower than eager). Six training forwards compile no more graphs
    than two, and the statistics then taken count all six."""
    from dataclasses import replace

    from test_v4_attention import CFG
    from torch._dynamo.utils import counters

    from birkhoff.model import build_model
    from birkhoff.model.v4_attention import take_indexer_stats
    from birkhoff.parallel.compile import CompileStats, compile_blocks
    from birkhoff.parallel.parallelize import block_slots
    from conftest import small_model

    torch._dynamo.reset()
    counters.clear()
    cfg = small_model(
        hidden_size=64, num_heads=4, num_layers=1, max_seq_len=16,
        attention=replace(CFG, layer_types=["csa"]),
    )  # fmt: skip
    net = build_model(cfg, seed=0)
    compile_blocks(block_slots(net), "aot_eager")
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    graphs = []
    for _ in range(6):
        net(tokens[:, :-1], tokens[:, 1:]).backward()
        graphs.append(CompileStats.now().graphs)
    assert graphs[1] > 0 and graphs[-1] == graphs[1], graphs
    kl_sum, forwards, _, wanted = take_indexer_stats(net).tolist()
    assert forwards == 6 and kl_sum > 0 and wanted > 0
