"""mHC on the `npu` backend (kernels/npu_mhc.py) through a stand-in torch_npu whose mHC
operators compute the vendor tests' golden formulas (tests/npu_stand_in.py): the read, the
merge, the merge-then-read and V4's Sinkhorn against the reference in float64, forward and
every gradient, with H_res far from symmetric (the operators take V4's orientation, ours
transposed); the calls they do not take run the reference; where the operators do not run
(a CANN without them) the table says so and nothing calls them; a model trains through them.
The signatures of these calls are checked against the wheel's docs in test_npu_backend.py."""

from __future__ import annotations

import sys

import pytest
import torch
from npu_stand_in import MHC_OPERATORS, StandIn

from birkhoff import kernels
from birkhoff.kernels import npu_mhc
from birkhoff.model.config import ResidualConfig
from conftest import small_model

BF16_BOUND = 1.5e-2  # relative error of outputs and gradients rounded to bfloat16


def mapping_args(n: int, width: int, tokens: tuple[int, int]) -> list:
    """mhc_read's arguments after the streams: V4's form, H_res's logits far from symmetric."""
    weight = torch.randn(2 * n + n * n, n * width) / (n * width) ** 0.5
    biases = [torch.randn(n), torch.randn(n), 3 * torch.randn(n, n)]
    return [weight, torch.rand(3) + 0.5, *biases, 1e-6, 20, 1e-6]


def relative(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


def check(op: str, inputs: list, bound: float) -> None:
    """`op` on the npu backend (inputs as given) against the reference in float64: every
    output and the gradient of every floating input, to `bound` relative."""
    exact = [t.detach().double().requires_grad_() if _floating(t) else t for t in inputs]
    given = [t.detach().clone().requires_grad_() if _floating(t) else t for t in inputs]
    expected, got = kernels.get(op, "reference")(*exact), kernels.get(op, "npu")(*given)
    expected, got = _tuple(expected), _tuple(got)
    for g, e in zip(got, expected, strict=True):
        assert relative(g, e) < bound, (op, relative(g, e))
    grads = [torch.randn_like(e) for e in expected]
    leaves = [t for t in exact if _floating(t)]
    expected_grads = torch.autograd.grad(expected, leaves, grads)
    got_grads = torch.autograd.grad(got, [t for t in given if _floating(t)], grads)
    for i, (g, e) in enumerate(zip(got_grads, expected_grads, strict=True)):
        assert g.dtype == inputs[[j for j, t in enumerate(inputs) if _floating(t)][i]].dtype
        assert relative(g, e) < bound, (op, i, relative(g, e))


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("n", [4, 6])
def test_the_mhc_operators_match_the_reference(stand_in, n):
    torch.manual_seed(n)
    width, batch = 16, (2, 5)
    streams = torch.randn(*batch, n, width, dtype=torch.bfloat16)
    check("mhc_read", [streams, *mapping_args(n, width, batch)], BF16_BOUND)
    layer_out = torch.randn(*batch, width, dtype=torch.bfloat16)
    h_res = torch.softmax(2 * torch.randn(*batch, n, n), -1)  # H_res and H_post: float32
    merge = [streams, layer_out, h_res, 2 * torch.rand(*batch, n)]
    check("mhc_post", merge, BF16_BOUND)
    check("mhc_merge_read", [*merge, *mapping_args(n, width, batch)], BF16_BOUND)
    check("sinkhorn_knopp_eps", [3 * torch.randn(*batch, n, n), 20, 1e-6], 1e-5)
    assert set(stand_in.calls) == MHC_OPERATORS


def test_calls_the_operators_do_not_take_run_the_reference(stand_in, monkeypatch):
    """float32 streams (the registry's dtype), the paper's form, 3 streams, more tokens than
    the Sinkhorn takes (the read; the merge has no such limit): the reference runs and only the
    probe calls torch_npu."""
    torch.manual_seed(0)
    args = mapping_args(4, 8, (1, 3))
    read = kernels.get("mhc_read", "npu")
    check("mhc_read", [torch.randn(1, 3, 4, 8), *args], 1e-5)  # float32: the reference's
    read(torch.randn(1, 3, 4, 8, dtype=torch.bfloat16), *args[:-1], None)  # the paper's form
    read(torch.randn(1, 3, 3, 8, dtype=torch.bfloat16), *mapping_args(3, 8, (1, 3)))
    monkeypatch.setattr(npu_mhc, "MOST_TOKENS", 2)
    read(torch.randn(1, 3, 4, 8, dtype=torch.bfloat16), *args)
    post = kernels.get("mhc_post", "npu")
    streams = torch.randn(1, 3, 3, 8, dtype=torch.bfloat16)  # 3 streams (no token limit)
    post(streams, torch.randn(1, 3, 8), torch.rand(1, 3, 3, 3), torch.rand(1, 3, 3))
    assert set(stand_in.calls) <= {"npu_mhc_sinkhorn"}  # the probe's 4 x 4


class WithoutMhc(StandIn):
    """torch_npu on a 910B: the Python bindings exist, CANN's operators do not."""

    def npu_mhc_sinkhorn(self, x, *, eps=1e-6, num_iters=20, out_flag=0):
        self.calls.append("npu_mhc_sinkhorn")
        raise RuntimeError(
            "aclnnMhcSinkhorn or aclnnMhcSinkhornGetWorkspaceSize not in libopapi.so, or "
            "libopapi.so not found.\n[ERROR] ..."
        )


def test_where_the_operators_do_not_run_the_table_says_why(monkeypatch):
    module = WithoutMhc()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    reason = "torch_npu's mHC operators do not run (aclnnMhcSinkhorn or "
    assert kernels.machine_lacks("mhc_read", "npu").startswith(reason)
    table = kernels.implementations("npu", torch.bfloat16)
    assert table["mhc_read"] == table["mhc_post"] == table["mhc_merge_read"] == "reference"
    assert table["rms_norm"] == "npu"  # the rest of the backend runs
    line = kernels.describe("npu")
    assert f"mhc_read (bfloat16 or float16 residual streams only; not here: {reason}" in line
    assert kernels.get("mhc_read", "npu") is kernels.get("mhc_read", "reference")
    assert module.calls == ["npu_mhc_sinkhorn"]  # probed once for the whole table


def test_a_v4_form_model_in_bfloat16_trains_through_the_mhc_operators(stand_in):
    """Streams in bfloat16 (as under FSDP's bfloat16 parameters): the model's loss and
    gradients on the npu backend as the reference's, within bfloat16 rounding."""
    cfg = small_model(max_seq_len=16, residual=ResidualConfig(form="v4"))
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    results = []
    for backend in ("reference", "npu"):
        from birkhoff.model import build_model

        model = build_model(cfg, backend, seed=5).to(torch.bfloat16)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads = torch.cat(
            [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
        )
        results.append((loss.detach().float(), grads))
    assert set(stand_in.calls) == MHC_OPERATORS | {"npu_rms_norm", "npu_rotary_mul", "npu_swiglu",
                                               "npu_fusion_attention"}  # fmt: skip
    (loss_ref, grads_ref), (loss_npu, grads_npu) = results
    torch.testing.assert_close(loss_npu, loss_ref, rtol=1e-2, atol=1e-2)
    assert torch.nn.functional.cosine_similarity(grads_npu, grads_ref, dim=0) > 0.999


def test_the_table_follows_the_residual_streams_dtype(stand_in):
    """Under autocast the residual streams stay float32 (the parameters'): the table says the
    reference runs mHC, and no mHC operator runs; with bfloat16 streams the operators do."""
    assert kernels.implementations("npu", torch.bfloat16, torch.float32)["mhc_read"] == "reference"
    assert kernels.implementations("npu", torch.bfloat16, torch.bfloat16)["mhc_read"] == "npu"
    line = kernels.describe("npu", torch.bfloat16, torch.float32)
    assert "fall back to reference: " in line and "mhc_read (bfloat16 or float16 residual" in line
    from birkhoff.model import build_model

    cfg = small_model(max_seq_len=16, residual=ResidualConfig(form="v4"))
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    model = build_model(cfg, "npu", seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert not set(stand_in.calls) & (MHC_OPERATORS - {"npu_mhc_sinkhorn"})  # the probe's only
