"""mHC: Sinkhorn projection accuracy and gradients, the stream mixing, and the composite gain."""

import pytest
import torch
import torch.nn.functional as F

from birkhoff import kernels
from birkhoff.kernels.mhc_reference import _NormalisedProjection, normalised_projection
from birkhoff.model import ModelConfig, build_model
from birkhoff.model.config import ResidualConfig
from birkhoff.model.mhc import HyperConnection, residual_stats

sinkhorn = kernels.get("sinkhorn_knopp")


def deviations(matrices: torch.Tensor) -> tuple[float, float]:
    rows = (matrices.sum(-1) - 1).abs().max().item()
    cols = (matrices.sum(-2) - 1).abs().max().item()
    return rows, cols


# Measured over 100k random 4x4 logit matrices (float32, seed 0), worst column-sum deviation
# after 20 iterations: std 1 -> 1.5e-3; diag-4 + N(0, 0.01) -> 1.9e-4; std 3 -> 5.8e-2;
# +-50 (no convergence: zero patterns without a perfect matching) -> 2.0. Rows: <= 2.4e-7.
@pytest.mark.parametrize(
    ("name", "make", "col_bound"),
    [
        ("training-scale std 1", lambda g: torch.randn(100_000, 4, 4, generator=g), 3e-3),
        (
            "identity-like diag 4",
            lambda g: 4 * torch.eye(4) + 0.01 * torch.randn(100_000, 4, 4, generator=g),
            5e-4,
        ),
        ("large std 3", lambda g: 3 * torch.randn(100_000, 4, 4, generator=g), 0.12),
    ],
)
def test_rows_exact_and_columns_within_measured_bounds(name, make, col_bound):
    logits = make(torch.Generator().manual_seed(0))
    rows, cols = deviations(sinkhorn(logits, 20))
    assert rows < 1e-6, name
    assert cols < col_bound, name
    assert cols > col_bound / 100, f"{name}: the bound is far looser than the measurement"


def test_extreme_logits_stay_finite_and_more_iterations_converge():
    g = torch.Generator().manual_seed(0)
    extreme = 50 * torch.sign(torch.randn(10_000, 4, 4, generator=g))
    assert torch.isfinite(sinkhorn(extreme, 20)).all()
    assert torch.isfinite(sinkhorn(80 * torch.sign(extreme), 20)).all()
    logits = torch.randn(10_000, 4, 4, generator=g)
    cols = [deviations(sinkhorn(logits, iters))[1] for iters in (5, 10, 20, 40)]
    assert cols[0] > cols[1] > cols[2] > cols[3]
    extreme_cols = [deviations(sinkhorn(extreme, iters))[1] for iters in (5, 20, 80)]
    # Rows sum to 1, so a column sums to at most n: deviation <= n - 1 = 3, and it shrinks.
    assert extreme_cols[2] <= extreme_cols[0] and all(c <= 3.0 + 1e-5 for c in extreme_cols)


def test_sinkhorn_gradients_match_finite_differences():
    logits = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 20), (logits,))


def _read_formula(x, h_pre):
    return sum(h_pre[..., i, None] * x[..., i, :] for i in range(x.shape[-2]))


def _merge_formula(x, f_out, h_res, h_post):
    n = x.shape[-2]
    rows = [
        sum(h_res[..., i, j, None] * x[..., j, :] for j in range(n)) + h_post[..., i, None] * f_out
        for i in range(n)
    ]
    return torch.stack(rows, dim=-2)


@pytest.mark.parametrize("n", [4, 3])
def test_stream_mixing_matches_the_formula(n):
    """The stream read and merge (eager: autograd Functions with written-out backward) against
    the per-stream sums written out, forward and every input's gradient, in float64; the
    output gradient arrives non-contiguous, as a transposed consumer would hand it."""
    pre, post = kernels.get("mhc_pre"), kernels.get("mhc_post")
    g = torch.Generator().manual_seed(n)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()

    x, h_pre, h_post = rand(2, 3, n, 8), rand(2, 3, n), rand(2, 3, n)
    h_res, f_out = rand(2, 3, n, n), rand(2, 3, 8)
    for op, formula, inputs, out_shape in (
        (pre, _read_formula, (x, h_pre), (2, 3, 8)),
        (post, _merge_formula, (x, f_out, h_res, h_post), (2, 3, n, 8)),
    ):
        got, expected = op(*inputs), formula(*inputs)
        torch.testing.assert_close(got, expected)
        grad = torch.randn(*reversed(out_shape), dtype=torch.float64, generator=g)
        grad = grad.permute(*reversed(range(grad.dim())))  # non-contiguous
        got_grads = torch.autograd.grad(got, inputs, grad)
        expected_grads = torch.autograd.grad(expected, inputs, grad)
        for i, (a, b) in enumerate(zip(got_grads, expected_grads, strict=True)):
            torch.testing.assert_close(a, b, msg=lambda m, i=i, op=op: f"{op.__name__} {i}: {m}")
        # one input without gradient: the others still right
        frozen = [t.detach() if i == 0 else t for i, t in enumerate(inputs)]
        partial = torch.autograd.grad(op(*frozen), frozen[1:], grad)
        for a, b in zip(partial, expected_grads[1:], strict=True):
            torch.testing.assert_close(a, b)


def test_stream_read_and_merge_dtypes_under_autocast():
    """Under bf16 autocast the read runs in bf16 (as a matmul would) and the merge keeps the
    float32 streams; both against the formula on the inputs as each runs them."""
    pre, post = kernels.get("mhc_pre"), kernels.get("mhc_post")
    x, h = torch.randn(2, 3, 4, 16), torch.rand(2, 3, 4)
    h_res, f_out = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        read, merged = pre(x, h), post(x, f_out, h_res, h)
    assert read.dtype == torch.bfloat16 and merged.dtype == torch.float32
    expected_read = _read_formula(x.bfloat16().double(), h.bfloat16().double())
    torch.testing.assert_close(read.double(), expected_read, rtol=2**-7, atol=1e-2)
    expected = _merge_formula(x.double(), f_out.double(), h_res.double(), h.double())
    torch.testing.assert_close(merged.double(), expected, rtol=1e-6, atol=1e-6)


def _sinkhorn_oracle(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """One matrix at a time in float64: columns, then rows, normalised in log space."""
    out = []
    for matrix in logits.double().reshape(-1, *logits.shape[-2:]):
        for _ in range(iters):
            matrix = matrix - torch.logsumexp(matrix, dim=0, keepdim=True)
            matrix = matrix - torch.logsumexp(matrix, dim=1, keepdim=True)
        out.append(matrix.exp())
    return torch.stack(out).view(logits.shape)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_sinkhorn_matches_a_per_matrix_loop(scale):
    """The batched op (laid out (n, n, batch), log_softmax per step, backward recomputing)
    against a per-matrix loop of logsumexp normalisations: values and gradients."""
    g = torch.Generator().manual_seed(int(scale))
    logits = (scale * torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g)).requires_grad_()
    weights = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g)
    got, expected = sinkhorn(logits, 20), _sinkhorn_oracle(logits, 20)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-10, atol=1e-10)


def test_normalised_projection_is_rms_norm_then_the_projection():
    """RMSNorm(vec(x)) W^T computed as (vec(x) W^T) / rms(vec(x)) (the normalised vector never
    formed): forward and both gradients against F.rms_norm then F.linear in float64, under
    bf16 autocast too, backward included (the mappings stay float32), no tokens, and the
    Function against finite differences."""
    g = torch.Generator().manual_seed(0)
    streams = 0.1 * torch.randn(2, 5, 4, 8, generator=g)  # mean square ~ eps: eps counts
    weight = torch.randn(24, 32, generator=g) / 6
    grad = torch.randn(2, 5, 24, generator=g, dtype=torch.float64)

    def oracle(x, w):
        return F.linear(F.rms_norm(x.flatten(-2), (32,), eps=1e-2), w)

    exact = [t.double().requires_grad_() for t in (streams, weight)]
    expected = oracle(*exact)
    expected_grads = torch.autograd.grad(expected, exact, grad)
    for autocast in (False, True):
        given = [t.clone().requires_grad_() for t in (streams, weight)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = normalised_projection(*given, 1e-2)
            got_grads = torch.autograd.grad(got, given, grad.float())  # backward in it too
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        for got_grad, want in zip(got_grads, expected_grads, strict=True):
            torch.testing.assert_close(got_grad.double(), want, rtol=1e-5, atol=1e-5)
    assert normalised_projection(streams[:0], weight, 1e-2).shape == (0, 5, 24)  # no tokens
    rows = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, w: _NormalisedProjection.apply(r, w, 1e-3), (rows, w))


def test_initial_mappings_behave_like_a_pre_norm_residual():
    layer = HyperConnection(8, ResidualConfig(), "reference")
    h_pre, h_post, h_res = layer.mappings(torch.randn(2, 5, 4, 8))
    assert h_pre[..., 0].min() > 0.95 and h_pre[..., 1:].max() < 0.05
    torch.testing.assert_close(h_post, torch.ones_like(h_post), atol=0.05, rtol=0)
    assert h_res.diagonal(dim1=-2, dim2=-1).min() > 0.9


def tiny_deep_model(mode: str, layers: int = 24) -> torch.nn.Module:
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=layers,
        num_heads=2,
        num_kv_heads=1,
        ffn_hidden_size=64,
        max_seq_len=16,
        residual=ResidualConfig(mode=mode, alpha_init=0.01),
    )
    return build_model(cfg)


def train_and_measure_gain(mode: str, steps: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = tiny_deep_model(mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    model(tokens, tokens)
    at_init = residual_stats(model)
    for _ in range(steps):
        model(tokens, tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    model(tokens, tokens)
    return at_init, residual_stats(model)


@pytest.mark.slow
def test_24_layer_mhc_keeps_the_composite_gain_bounded_while_hc_grows():
    mhc_init, mhc_trained = train_and_measure_gain("mhc", 10)
    hc_init, hc_trained = train_and_measure_gain("hc", 10)
    # mHC: 48 H_res maps composed; rows stay stochastic so the forward gain is 1 by
    # construction (not reported), and the column deviations keep the backward gain near 1
    # (measured 1.001 after 10 steps, 1.005 after 50). HC's composite gain is ~8e3 after 10
    # steps (7e4 after 50).
    for stats in (mhc_init, mhc_trained):
        assert "mhc_gain_fwd" not in stats and "mhc_row_dev" not in stats
        assert stats["mhc_gain_bwd"] < 2.0
    # HC is unconstrained: its composite gain drifts away from 1 and grows with training.
    assert hc_trained["mhc_gain_fwd"] > max(2.0, hc_init["mhc_gain_fwd"])
    print({"mhc": (mhc_init, mhc_trained), "hc": (hc_init, hc_trained)})


def test_a_violated_constraint_fails_the_step(tmp_path):
    from test_train import train_in_process

    from birkhoff.train.failures import ResidualConstraintError

    # 1 Sinkhorn iteration leaves columns off by far more than this tolerance.
    with pytest.raises(ResidualConstraintError, match=r"model\.residual\.tolerance=1e-06"):
        train_in_process(
            tmp_path,
            [
                "train.steps=2",
                "optim.warmup_steps=1",
                "model.residual.sinkhorn_iters=1",
                "model.residual.res_init_logit=0.5",
                "model.residual.tolerance=1e-6",
            ],
        )


def test_dynamic_mappings_follow_the_formulas():
    torch.manual_seed(0)
    layer = HyperConnection(8, ResidualConfig(alpha_init=1.0), "reference")
    x = torch.randn(2, 3, 4, 8)
    h_pre, h_post, h_res = layer.mappings(x)
    flat = torch.nn.functional.rms_norm(x.flatten(-2), (32,))
    pre, post, res = (flat @ layer.proj.weight.T).split([4, 4, 16], dim=-1)
    torch.testing.assert_close(h_pre, torch.sigmoid(pre + layer.bias_pre))
    torch.testing.assert_close(h_post, 2 * torch.sigmoid(post + layer.bias_post))
    torch.testing.assert_close(h_res, sinkhorn(res.unflatten(-1, (4, 4)) + layer.bias_res, 20))


def test_sinkhorn_accepts_a_single_matrix():
    single = sinkhorn(torch.randn(4, 4), 20)
    assert single.shape == (4, 4) and deviations(single)[0] < 1e-6


def test_residual_streams_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = tiny_deep_model("mhc", layers=4)
    tokens = torch.randint(0, 64, (2, 16))
    reference = model(tokens)
    block_out = []
    model.blocks[str(len(model.blocks) - 1)].register_forward_hook(
        lambda m, i, o: block_out.append(o[0])
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert block_out[0].dtype == torch.float32
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_the_tolerance_check_sees_every_micro_batch():
    torch.manual_seed(0)
    model = tiny_deep_model("mhc", layers=2)
    layer = model.blocks["0"].attention_residual
    model(torch.randint(0, 64, (2, 16)))
    with torch.no_grad():  # a second micro-batch whose H_res is far off: 1 Sinkhorn iteration
        layer.cfg.sinkhorn_iters = 1
        layer.bias_res.normal_(std=5.0)
    model(torch.randint(0, 64, (2, 16)))
    layer.cfg.sinkhorn_iters = 20
    with torch.no_grad():
        layer.bias_res.copy_(torch.eye(4) * 4)
    model(torch.randint(0, 64, (2, 16)))  # the last micro-batch alone would look fine
    assert residual_stats(model)["mhc_col_dev"] > 0.05
    model(torch.randint(0, 64, (2, 16)))
    assert residual_stats(model)["mhc_col_dev"] < 0.05, "reading the stats starts a new step"


@pytest.mark.parametrize("form", ["paper", "v4"])
def test_sinkhorn_recomputes_in_backward_what_unrolled_autograd_computes(form):
    """The registered op keeps only its logits for backward (per matrix n^2 values, not two
    per iteration), its backward's recomputation reaches no outer saved-tensor hook, and its
    gradient is that of autograd through the unrolled iterations."""
    from birkhoff.kernels.mhc_reference import _sinkhorn_eps, _sinkhorn_log

    op = kernels.get("sinkhorn_knopp" if form == "paper" else "sinkhorn_knopp_eps")
    unrolled = _sinkhorn_log if form == "paper" else _sinkhorn_eps
    extra = () if form == "paper" else (1e-6,)
    logits = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    saved: list[torch.Tensor] = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with hooks:
        out = op(logits, 20, *extra)
    assert [t.shape for t in saved] == [logits.shape]
    loss = (out * weights).sum()
    saved.clear()
    with hooks:  # an outer hook while backward recomputes
        (got,) = torch.autograd.grad(loss, logits)
    assert saved == []
    (expected,) = torch.autograd.grad((unrolled(logits, 20, *extra) * weights).sum(), logits)
    torch.testing.assert_close(out, unrolled(logits, 20, *extra), rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_the_constraint_check_takes_the_worst_row_and_column_of_every_matrix(mode):
    """The recorded deviation against a loop over the matrices of two micro-batches: the
    largest |column sum - 1| of any of them, and in hc mode the largest |row sum - 1| (mhc's
    rows sum to 1 by construction)."""
    torch.manual_seed(5)
    layer = HyperConnection(8, ResidualConfig(mode=mode), "reference").train()
    batches = [torch.rand(2, 3, 4, 4) * 0.5, torch.rand(1, 5, 4, 4) * 0.4]
    batches[1][0, 2, 1, 3] = 1.2  # sums above 1 in a column and a row...
    batches[0][1, 1, :, 2] = batches[0][1, 1, 3, :] = 0.0  # ...the worst below 1
    for h_res in batches:
        layer._record(h_res)
    matrices = [m for h in batches for m in h.reshape(-1, 4, 4)]
    rows = max(abs(m[i, :].sum().item() - 1) for m in matrices for i in range(4))
    cols = max(abs(m[:, j].sum().item() - 1) for m in matrices for j in range(4))
    expected = [cols] if mode == "mhc" else [rows, cols]
    assert layer.last_deviation.tolist() == pytest.approx(expected, rel=1e-6)
