"""The `mfu` metric: model FLOPs per token against the count written out for a dense model,
the peak per device (recipe override, the preset a device's name matches, the CPU's measured
matmul rate, cached), and the metric a run logs against tokens/s x FLOPs / peak."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
import torch.utils.benchmark as benchmark
from test_plan import DENSE, KV, C, F, H, L, V
from test_train import read_metrics, train_in_process

from birkhoff.errors import RecipeError
from birkhoff.launch.recipe import load_recipe
from birkhoff.train import mfu
from conftest import SMALL_OVERRIDES, compose_recipe


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_of_a_dense_model_written_out(tied):
    """6 x (every weight matmul: q, k, v, o, the SwiGLU, the head) plus 3 x the attention's
    score and value products (2 x 2 x C per visible key, T / 2 keys on average). A head tied
    to the embedding multiplies all the same."""
    seq, d = 64, C // H
    matmul = L * (2 * C * C + 2 * KV * d * C + 3 * C * F) + C * V
    expected = 6 * matmul + 3 * L * 4 * C * seq / 2
    cfg = dataclasses.replace(DENSE, tie_embeddings=tied)
    assert mfu.flops_per_token(cfg, seq) == pytest.approx(expected)


def test_peak_per_device(monkeypatch, tmp_path):
    cuda = torch.device("cuda", 0)
    assert mfu.device_peak(cuda, 123.0, torch.bfloat16, tmp_path) == mfu.Peak(
        123.0, "backend.peak_tflops"
    )
    monkeypatch.setattr(mfu, "_device_name", lambda device: "NVIDIA H200")
    assert mfu.device_peak(cuda, None, torch.bfloat16, tmp_path) == mfu.Peak(989, "h200 preset")
    monkeypatch.setattr(mfu, "_device_name", lambda device: "Ascend910B3")
    assert mfu.device_peak(cuda, None, torch.bfloat16, tmp_path).source == "ascend_910b preset"
    monkeypatch.setattr(mfu, "_device_name", lambda device: "NVIDIA A10")
    with pytest.raises(RecipeError, match="no bf16 peak is known for device 'NVIDIA A10'"):
        mfu.device_peak(cuda, None, torch.bfloat16, tmp_path)


def test_cpu_peak_is_measured_once_and_cached(monkeypatch, tmp_path):
    measured = mfu.cpu_matmul_peak(torch.float32, tmp_path)
    # an independent timing of the same product, 4 times: within a factor of 4 (noisy cores)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    timer = benchmark.Timer("torch.mm(a, b)", globals={"a": a, "b": b, "torch": torch})
    independent = 2 * 1024**3 / timer.blocked_autorange(min_run_time=0.2).median / 1e12
    assert 0.25 < measured / independent < 4
    cached = json.loads((tmp_path / mfu.CPU_PEAK_FILE).read_text())
    assert list(cached.values()) == [measured]
    path = tmp_path / mfu.CPU_PEAK_FILE
    path.write_text(json.dumps({key: 1e6 for key in cached}))  # a rate no CPU reaches
    assert mfu.cpu_matmul_peak(torch.float32, tmp_path, refresh=True) == 1e6  # the best kept
    monkeypatch.setattr(torch, "mm", lambda *args: pytest.fail("measured again"))
    assert mfu.cpu_matmul_peak(torch.float32, tmp_path) == 1e6


def test_a_slow_dtype_is_measured_on_narrower_matrices_in_about_a_second(tmp_path):
    """bfloat16 without the CPU's native instructions took 3.1 s per 1024-wide product (66 s
    to measure, before every bf16 run on a new machine). The measurement narrows the matrices
    to keep each product near PEAK_MATMUL_S; its rate stays within a factor of 4 of an
    independent timing at the width it chose (here: of the same product as timed alone)."""
    probe = torch.randn(256, 256, dtype=torch.bfloat16)
    timer = benchmark.Timer("torch.mm(a, a)", globals={"a": probe, "torch": torch})
    once = timer.blocked_autorange(min_run_time=0.2).median
    start = time.perf_counter()
    measured = mfu.cpu_matmul_peak(torch.bfloat16, tmp_path)
    seconds = time.perf_counter() - start
    width = min(1024, max(128, int(256 * (mfu.PEAK_MATMUL_S / once) ** (1 / 3)) // 64 * 64))
    assert seconds < 10  # 20 products of about PEAK_MATMUL_S each, and the probes
    a = torch.randn(width, width, dtype=torch.bfloat16)
    timer = benchmark.Timer("torch.mm(a, a)", globals={"a": a, "torch": torch})
    independent = 2 * width**3 / timer.blocked_autorange(min_run_time=0.2).median / 1e12
    assert 0.25 < measured / independent < 4


def test_the_logged_mfu_is_tokens_per_second_times_flops_over_the_peak(tmp_path):
    overrides = ["train.steps=2", "optim.warmup_steps=1", "backend.peak_tflops=0.5"]
    summary = train_in_process(tmp_path, overrides)
    recipe, _ = load_recipe(compose_recipe(SMALL_OVERRIDES + overrides), env={})
    flops = mfu.flops_per_token(recipe.model, recipe.data.seq_len)
    steps, _ = read_metrics(tmp_path)
    for record in steps:
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * flops / 0.5e12)
    assert summary["mfu"] == pytest.approx(summary["tokens_per_s"] * flops / 0.5e12)
