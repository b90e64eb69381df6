"""The `cpu` backend (kernels/cpu_*.c through cpu_mhc.py, cpu_mhc_read.py, cpu_rows.py): every
op against the reference run in float64, forward and every input gradient, at token counts
that fill a block of 16 lanes and part of the next; Sinkhorn at logits far from doubly
stochastic and against its own definition; a model built with it against the same model with
the reference ops; how the backend resolves, what happens where its kernels cannot be built,
and the build cache."""

from __future__ import annotations

import pytest
import torch
from test_train import read_metrics, train_in_process

from birkhoff import kernels
from birkhoff.errors import RecipeError
from birkhoff.kernels import (
    cpu_build,
    cpu_mhc,
    cpu_mhc_merge_read,
    cpu_mhc_read,
    cpu_rows,
    reference,
)
from conftest import (
    assert_backend_trains_as_reference,
    assert_within_own_error,
    compare,
    concatenated,
    moe_engram_model,
)

SHAPES = [(4, 64, 37), (3, 200, 5), (1, 17, 16)]  # (streams, channels, tokens)


@pytest.mark.parametrize(("n", "c", "tokens"), SHAPES)
def test_cpu_mhc_pre_matches_the_reference(n, c, tokens):
    torch.manual_seed(n * c)
    compare(reference.mhc_pre, cpu_mhc.mhc_pre, [torch.randn(tokens, n, c), torch.rand(tokens, n)])


@pytest.mark.parametrize(("n", "c", "tokens"), SHAPES)
def test_cpu_mhc_post_matches_the_reference(n, c, tokens):
    torch.manual_seed(n * c + 1)
    streams, layer_out = torch.randn(2, tokens, n, c), torch.randn(2, tokens, c)
    h_res, h_post = torch.rand(2, tokens, n, n), 2 * torch.rand(2, tokens, n)
    compare(reference.mhc_post, cpu_mhc.mhc_post, [streams, layer_out, h_res, h_post])


@pytest.mark.parametrize("form", ["sinkhorn_knopp", "sinkhorn_knopp_eps"])
@pytest.mark.parametrize(
    ("n", "tokens", "iters", "scale"), [(4, 37, 20, 2), (3, 5, 20, 100), (4, 3, 1, 2)]
)
def test_cpu_sinkhorn_matches_the_reference(form, n, tokens, iters, scale):
    """Both forms forward and through the recomputing backward. Logits of scale 100 put
    entries e^-200 apart: the log-space form's exp and log run on polynomials, and entries
    below float32's range (e^-87) must come out 0, not garbage."""
    torch.manual_seed(n * tokens)
    logits = scale * torch.randn(tokens, n, n)
    extra = (iters,) if form == "sinkhorn_knopp" else (iters, 1e-6)
    ops = getattr(reference, form), getattr(cpu_mhc, form)
    compare(*(lambda x, op=op: op(x, *extra) for op in ops), [logits])


def test_cpu_sinkhorn_is_the_iteration_written_out():
    """Against the definition as a plain loop per matrix in float64 (not the reference's
    code): columns then rows normalised, 20 times."""
    torch.manual_seed(3)
    logits = 3 * torch.randn(21, 4, 4)
    expected = logits.double().exp()
    for _ in range(20):
        expected = expected / expected.sum(-2, keepdim=True)  # each column sums to 1
        expected = expected / expected.sum(-1, keepdim=True)  # then each row
    got = cpu_mhc.sinkhorn_knopp(logits, 20)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(21, 4))


@pytest.mark.parametrize(
    ("n", "c", "form_eps", "tokens"), [(4, 64, None, 5), (3, 40, 1e-3, 5), (4, 200, 1e-6, 16)]
)
def test_cpu_mhc_mapping_matches_the_reference(n, c, form_eps, tokens):
    """All three mappings and the gradients of the streams, the projection, the scales and
    the biases; 10 tokens (a block of 16 lanes partly filled) and 32 (two whole blocks); V4's
    form with eps 1e-3, large enough to see if it were dropped."""
    torch.manual_seed(n * c)
    streams, weight = (
        torch.randn(2, tokens, n, c),
        torch.randn(2 * n + n * n, n * c) / (n * c) ** 0.5,
    )
    alpha, biases = torch.rand(3) + 0.5, [torch.randn(n), torch.randn(n), torch.randn(n, n)]

    ops = (reference.mhc_mapping, cpu_mhc.mhc_mapping)
    compare(
        *(concatenated(op, 1e-6, 20, form_eps) for op in ops), [streams, weight, alpha, *biases]
    )


@pytest.mark.parametrize(
    ("shape", "eps"), [((37, 64), 1e-6), ((2, 5, 4, 200), 0.3), ((3, 24), 1e-6)]
)
def test_cpu_rms_norm_matches_the_reference(shape, eps):
    """Rows of every length the vector loops split (64, 200: a remainder, 24), in 2 and 4
    dimensions; the weight's gradient summed per thread; an eps of 0.3, against mean squares
    near 1, would show if it were dropped."""
    torch.manual_seed(len(shape) + shape[-1])
    inputs = [torch.randn(*shape), torch.rand(shape[-1]) + 0.5]
    ops = (reference.rms_norm, cpu_rows.rms_norm)
    compare(*(lambda x, w, op=op: op(x, w, eps) for op in ops), inputs)


def read_inputs(n: int, c: int, tokens: int) -> list[torch.Tensor]:
    """Streams (2, tokens, n, c), the projection's weight, alpha and the three biases."""
    weight = torch.randn(2 * n + n * n, n * c) / (n * c) ** 0.5
    biases = [torch.randn(n), torch.randn(n), torch.randn(n, n)]
    return [torch.randn(2, tokens, n, c), weight, torch.rand(3) + 0.5, *biases]


@pytest.mark.parametrize(
    ("n", "c", "form_eps", "norm_eps", "tokens"),
    [(4, 64, None, 1e-6, 37), (3, 40, 1e-3, 0.3, 5), (4, 200, 1e-6, 1e-6, 16)],
)
def test_cpu_mhc_read_matches_the_reference(n, c, form_eps, norm_eps, tokens):
    """The fused mappings and read (H_pre x, H_post, H_res, the streams passed to the merge)
    and the gradients of the streams, the projection, the scales and the biases against the
    reference's mapping then read in float64, element by element, within twice the float32
    reference's own largest error there (at least 1e-5): the op sums the projection and its
    gradients in another order than a GEMM, and the projection's gradient, a sum over tokens
    of the Sinkhorn gradient, carries float32's error at 1e-5 of its largest values. A norm
    eps of 0.3, against mean squares near 1, would show if it were dropped."""
    torch.manual_seed(n * c + 2)
    inputs = read_inputs(n, c, tokens)
    runs = {}
    for name, op, dtype in [
        ("exact", reference.mhc_read, torch.float64),
        ("reference", reference.mhc_read, torch.float32),
        ("cpu", cpu_mhc_read.mhc_read, torch.float32),
    ]:
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        out = concatenated(op, norm_eps, 20, form_eps)(*leaves)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        runs[name] = (out, *torch.autograd.grad(out, leaves, grad))
    for i, (exact, own, got) in enumerate(zip(*runs.values(), strict=True)):
        assert_within_own_error(got, own, exact, f"output or gradient {i}")


def test_cpu_mhc_read_sums_the_weight_gradient_over_many_tokens_as_a_gemm_does():
    """The projection weight's gradient sums over every token: 8,192 here. Each thread's sum is
    kept in double (a float32 running sum over a thread's tokens ends up 7x the float32
    GEMM's error here, 14x at 65,536 tokens), so the op stays within twice the float32
    reference's own error of the float64 one."""
    torch.manual_seed(11)
    inputs = read_inputs(4, 64, 4096)
    grad = torch.randn(2, 4096, 64, dtype=torch.float64)
    errors = {}
    exact = None
    for name, op, dtype in [
        ("exact", reference.mhc_read, torch.float64),
        ("reference", reference.mhc_read, torch.float32),
        ("cpu", cpu_mhc_read.mhc_read, torch.float32),
    ]:
        leaves = [t.to(dtype).requires_grad_(i == 1) for i, t in enumerate(inputs)]
        layer_in = op(*leaves, 1e-6, 20, 1e-6)[0]
        (d_weight,) = torch.autograd.grad(layer_in, leaves[1], grad.to(dtype))
        if exact is None:
            exact = d_weight
        errors[name] = ((d_weight - exact).abs().max() / exact.abs().max()).item()
    assert errors["cpu"] <= 2 * errors["reference"], errors


def test_cpu_mhc_read_with_frozen_streams_takes_any_gradient_of_the_passed_streams():
    """Streams that need no gradient and a weight that does: the streams passed on for the
    merge still take a gradient (a broadcast one here, not contiguous), which the backward
    leaves alone, and the weight's gradient is the reference's."""
    torch.manual_seed(12)
    inputs = read_inputs(4, 24, 19)
    results = []
    for op in (reference.mhc_read, cpu_mhc_read.mhc_read):
        leaves = [t.clone().requires_grad_(i == 1) for i, t in enumerate(inputs)]
        layer_in, _, _, passed = op(*leaves, 1e-6, 20, 1e-6)
        loss = (layer_in * torch.linspace(-1, 1, layer_in.numel()).view(layer_in.shape)).sum()
        results.append(torch.autograd.grad(loss + passed.sum(), leaves[1]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("used", [0, 1, 2, 3])
def test_cpu_mhc_read_takes_outputs_with_no_gradient(used):
    """Only one of the four outputs feeds the loss (the others' gradients reach the backward
    as None: NULL in C, or zeros for the read; the streams passed on alone give the streams
    exactly their gradient): every input's gradient still matches the reference's (zero for
    a bias the output does not depend on)."""
    torch.manual_seed(used)
    inputs = read_inputs(4, 24, 19)
    exact = [t.double().requires_grad_() for t in inputs]
    given = [t.clone().requires_grad_() for t in inputs]
    expected = reference.mhc_read(*exact, 1e-6, 20, 1e-6)[used]
    got = cpu_mhc_read.mhc_read(*given, 1e-6, 20, 1e-6)[used]
    grad = torch.randn(expected.shape, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, exact, grad, allow_unused=True)
    got_grads = torch.autograd.grad(got, given, grad.float())
    for tensor, e, g in zip(exact, expected_grads, got_grads, strict=True):
        e = torch.zeros_like(tensor) if e is None else e
        scale = e.abs().max().item() or 1.0  # float32 against float64, relative to the largest
        torch.testing.assert_close(g.double(), e, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("frozen", [0, 1])
def test_cpu_mhc_read_skips_the_gradient_of_a_frozen_input(frozen, monkeypatch):
    """A frozen projection weight (or streams that need no gradient): the C backward is handed
    no output for its gradient (NULL: the tiles for it do not run), and the other inputs'
    gradients still match the reference's. No GEMM runs: the C pass computes both."""
    torch.manual_seed(8)
    inputs = read_inputs(4, 16, 9)
    products, outputs = [], []
    real_mm, real_call = torch.mm, cpu_mhc_read.call
    monkeypatch.setattr(torch, "mm", lambda *a, **k: products.append(1) or real_mm(*a, **k))

    def recording_call(name, *args):
        if name == "mhc_read_backward":
            outputs.append([args[15] is not None, args[16] is not None])  # dx, d_W sums
        return real_call(name, *args)

    monkeypatch.setattr(cpu_mhc_read, "call", recording_call)
    results = []
    for op in (reference.mhc_read, cpu_mhc_read.mhc_read):
        leaves = [t.clone().requires_grad_(i != frozen) for i, t in enumerate(inputs)]
        out = op(*leaves, 1e-6, 20, 1e-6)
        products.clear()
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in out)
        results.append(torch.autograd.grad(loss, [t for t in leaves if t.requires_grad]))
    assert not products
    assert outputs == [[frozen != 0, frozen != 1]]
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_cpu_mhc_read_runs_forward_and_backward_under_autocast():
    """Under bf16 autocast (the pipeline's step runs its backward inside it) the op's own
    GEMMs stay float32: the C passes write float32 into their outputs. The read comes back in
    autocast's dtype, the mappings and every gradient match the float64 reference."""
    torch.manual_seed(4)
    inputs = read_inputs(4, 32, 19)
    exact = [t.double().requires_grad_() for t in inputs]
    given = [t.clone().requires_grad_() for t in inputs]
    expected = reference.mhc_read(*exact, 1e-6, 20, 1e-6)
    grads = [torch.randn(e.shape, dtype=torch.float64) for e in expected]
    expected_grads = torch.autograd.grad(expected, exact, grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cpu_mhc_read.mhc_read(*given, 1e-6, 20, 1e-6)
        got_grads = torch.autograd.grad(
            got, given, [g.to(o.dtype) for g, o in zip(grads, got, strict=True)]
        )
    assert [o.dtype for o in got] == [torch.bfloat16, *[torch.float32] * 3]
    torch.testing.assert_close(got[0].double(), expected[0], rtol=2**-7, atol=1e-2)
    for o, e in zip(got[1:], expected[1:], strict=True):
        torch.testing.assert_close(o.double(), e, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):  # the read's gradient arrived in bf16
        torch.testing.assert_close(g.double(), e, rtol=1e-2, atol=1e-2 * e.abs().max().item())


@pytest.mark.parametrize("needed", ["x", "weight"])
def test_cpu_rms_norm_computes_only_the_gradient_asked_for(needed):
    """A frozen weight (or input): the other gradient alone, against the reference's."""
    torch.manual_seed(6)
    x, weight = torch.randn(33, 48), torch.rand(48) + 0.5
    results = []
    for op in (reference.rms_norm, cpu_rows.rms_norm):
        leaves = [
            x.clone().requires_grad_(needed == "x"),
            weight.clone().requires_grad_(needed == "weight"),
        ]
        out = op(*leaves, 1e-6)
        results.append(torch.autograd.grad(out, [t for t in leaves if t.requires_grad], out.cos()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_cpu_rms_norm_sums_the_weight_gradient_over_many_rows_accurately():
    """65,536 rows: the weight's gradient is a sum over them, kept in double per thread (a
    float32 running sum missed float64 by 9e-6 relative here; the reference's blocked sum
    by 1.4e-7)."""
    torch.manual_seed(7)
    x, weight = torch.randn(65536, 64), torch.rand(64) + 0.5
    grad = torch.randn(65536, 64)
    w64 = weight.double().requires_grad_()
    (expected,) = torch.autograd.grad(
        reference.rms_norm(x.double(), w64, 1e-6), [w64], grad.double()
    )
    w32 = weight.clone().requires_grad_()
    (got,) = torch.autograd.grad(cpu_rows.rms_norm(x, w32, 1e-6), [w32], grad)
    error = ((got.double() - expected).abs().max() / expected.abs().max()).item()
    assert error < 1e-6, error


def test_cpu_mhc_keeps_the_dtypes_under_autocast():
    """A bf16 sublayer output merges into float32 streams; the stream read returns autocast's
    dtype as the reference's matmul does (the cpu kernel accumulates in float32)."""
    streams, layer_out = torch.randn(2, 3, 4, 32), torch.randn(2, 3, 32).bfloat16()
    h_res, h_post = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merged = cpu_mhc.mhc_post(streams, layer_out, h_res, h_post)
        expected = reference.mhc_post(streams, layer_out, h_res, h_post)
        read = cpu_mhc.mhc_pre(streams, h_post)
        expected_read = reference.mhc_pre(streams, h_post)
    assert merged.dtype == torch.float32 and read.dtype == expected_read.dtype == torch.bfloat16
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(read, expected_read, rtol=2**-7, atol=1e-2)


def test_the_cpu_backend_runs_the_reference_for_float64_and_says_so():
    """float64 keeps the reference's precision; under autocast (bf16 compute) the residual is
    still float32 and the C kernels run, which the table says."""
    streams, h_pre = (
        torch.randn(3, 4, 8, dtype=torch.float64),
        torch.rand(3, 4, dtype=torch.float64),
    )
    got = kernels.get("mhc_pre", "cpu")(streams, h_pre)
    assert got.dtype == torch.float64
    assert torch.equal(got, reference.mhc_pre(streams, h_pre))
    own = {"mhc_mapping", "mhc_post", "mhc_pre", "mhc_read", "sinkhorn_knopp", "sinkhorn_knopp_eps"}
    own |= {"engram_merge", "rms_norm", "mhc_merge_read", "v4_attention", "swiglu"}
    own |= {"rope_trailing", "kv_compress", "moe_permute", "moe_unpermute"}
    own |= {"linear_cross_entropy"}
    for dtype in (None, torch.float32, torch.bfloat16):
        table = kernels.implementations("cpu", dtype)
        assert {op for op, impl in table.items() if impl == "cpu"} == own, dtype
    assert kernels.implementations("cpu", torch.float64)["mhc_pre"] == "reference"
    assert "cpu for 16 of" in kernels.describe("cpu", torch.bfloat16)
    assert "mhc_post (float32 or bfloat16 or float16 only)" in kernels.describe("cpu")


def test_bf16_streams_come_back_in_bf16():
    """Streams held in bf16 (FSDP's param_dtype): computed in float32, returned rounded."""
    torch.manual_seed(5)
    streams, layer_out = torch.randn(2, 3, 4, 32).bfloat16(), torch.randn(2, 3, 32).bfloat16()
    h_res, h_post, logits = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4), torch.randn(2, 3, 4, 4)
    merged = kernels.get("mhc_post", "cpu")(streams, layer_out, h_res, h_post)
    exact = reference.mhc_post(*(t.double() for t in (streams, layer_out, h_res, h_post)))
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.double(), exact, rtol=2**-7, atol=1e-2)
    balanced = kernels.get("sinkhorn_knopp", "cpu")(logits.bfloat16(), 20)
    assert balanced.dtype == torch.bfloat16
    expected = reference.sinkhorn_knopp(logits.bfloat16().double(), 20)
    torch.testing.assert_close(balanced.double(), expected, rtol=2**-7, atol=1e-2)
    inputs = read_inputs(4, 32, 3)
    inputs[0] = streams
    layer_in, h_post, h_res, passed = kernels.get("mhc_read", "cpu")(*inputs, 1e-6, 20, 1e-6)
    assert (layer_in.dtype, h_post.dtype, h_res.dtype) == (torch.bfloat16, *[torch.float32] * 2)
    assert passed is streams  # the read ran on a float32 copy: no cast to pass it on
    exact = reference.mhc_read(*(t.double() for t in inputs), 1e-6, 20, 1e-6)
    torch.testing.assert_close(layer_in.double(), exact[0], rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(h_res.double(), exact[2], rtol=1e-5, atol=1e-5)


def test_a_model_with_cpu_kernels_trains_as_the_reference_one():
    assert_backend_trains_as_reference("cpu")


def test_a_model_with_moe_and_engram_trains_on_the_cpu_kernels_as_on_the_reference():
    assert_backend_trains_as_reference("cpu", cfg=moe_engram_model())


@pytest.fixture
def rebuild(monkeypatch, tmp_path):
    """The build attempted afresh in an empty cache (the process keeps its first outcome),
    and the outcome of this session's build restored afterwards."""
    monkeypatch.setenv("BIRKHOFF_CACHE_DIR", str(tmp_path))
    cpu_build._build_or_reason.cache_clear()
    yield tmp_path
    cpu_build._build_or_reason.cache_clear()


def test_the_cpu_backend_resolves_per_device(rebuild):
    assert kernels.backend_for("auto", "cpu") == "cpu"
    assert kernels.backend_for("cpu", "cpu") == "cpu"
    assert kernels.auto_note("auto", "cpu") is None
    built = list((rebuild / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("cpu_kernels_"), built  # no partial
    with pytest.raises(RecipeError, match=r"runs on the CPU \(this rank runs on cuda\)"):
        kernels.backend_for("cpu", "cuda")


def test_without_a_compiler_auto_runs_the_reference_and_says_why(rebuild, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    assert kernels.backend_for("auto", "cpu") == "reference"
    note = kernels.auto_note("auto", "cpu")
    assert note == (
        "the cpu kernels did not build (no C compiler found (CC='no-such-compiler' is not on the "
        "PATH; set CC, or install gcc))"
    )
    with pytest.raises(RecipeError, match=r"backend.kernels.*no C compiler found.*use auto"):
        kernels.backend_for("cpu", "cpu")
    assert "cpu" not in kernels.available_backends()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(rebuild))  # no cc, no gcc
    cpu_build._build_or_reason.cache_clear()
    assert "neither cc nor gcc is on the PATH" in kernels.auto_note("auto", "cpu")


def test_a_failed_build_names_the_error_and_leaves_nothing(rebuild, monkeypatch, tmp_path):
    source = tmp_path / "broken.c"
    source.write_text("void f(void) { this is not C; }\n")
    monkeypatch.setattr(cpu_build, "SOURCES", (str(source),))
    problem = cpu_build.build_problem()
    assert problem is not None and "failed on" in problem and "error" in problem, problem
    assert list((rebuild / "kernels").iterdir()) == []  # the partial file removed


def test_a_run_on_the_cpu_kernels_follows_the_reference_run(tmp_path):
    """The trainer with backend.kernels=cpu (mHC, MoE and Engram at the tests' sizes, 3 steps
    of AdamW) against the same run on the reference kernels, step by step."""
    losses, summaries = {}, {}
    for backend in ("reference", "cpu"):
        run = tmp_path / backend
        summaries[backend] = train_in_process(
            run, ["train.steps=3", "train.eval_every=0", f"backend.kernels={backend}"]
        )
        losses[backend] = [r["loss"] for r in read_metrics(run)[0]]
    assert all(
        summaries["cpu"]["kernels"][op] == "cpu" for op in ("mhc_post", "mhc_read", "rms_norm")
    )
    assert summaries["reference"]["kernels"]["mhc_post"] == "reference"
    assert len(losses["cpu"]) == 3
    torch.testing.assert_close(losses["cpu"], losses["reference"], rtol=1e-5, atol=0)


def test_the_cpu_kernels_are_well_formed_custom_ops():
    """torch.library's own checks of each op: its schema, its fake (shape-only) version
    against the real one, its autograd registration, and tracing through AOTAutograd."""
    torch.manual_seed(0)
    q, a, b = torch.randn(19, 24), torch.rand(24) + 0.5, torch.randn(24)
    cases = [
        (cpu_mhc.stream_read, (torch.randn(19, 4, 8), torch.rand(19, 4))),
        (
            cpu_mhc.stream_merge,
            (torch.randn(19, 4, 8), torch.randn(19, 8), torch.rand(19, 4, 4), torch.rand(19, 4)),
        ),
        (cpu_mhc.sinkhorn, (torch.randn(19, 4, 4), 20, -1.0)),
        (cpu_mhc.sinkhorn, (torch.randn(19, 4, 4), 20, 1e-6)),
        (cpu_mhc.mhc_tail, (q, a, b, 4, 20, 1e-6, 1e-6)),
        (
            cpu_mhc_read.mhc_read_op,
            (torch.randn(19, 4, 8), torch.randn(24, 32), a, b, 1e-6, 20, 0.0, -1.0),
        ),
        (
            cpu_mhc_read.mhc_read_op,
            (torch.randn(19, 4, 8), torch.randn(24, 32), a, b, 1e-6, 20, 1e-6, 1e-6),
        ),
        (cpu_rows.rms_norm_op, (torch.randn(19, 40), torch.rand(40), 1e-6)),
        (
            cpu_mhc_merge_read.merge_read_op,
            (
                *(torch.randn(19, 4, 8), torch.randn(19, 8), torch.rand(19, 4, 4)),
                *(torch.rand(19, 4), torch.randn(24, 32), a, b, 1e-6, 20, 0.0, -1.0),
            ),
        ),
    ]
    for op, args in cases:
        grads = [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
        torch.library.opcheck(op, grads)


@pytest.mark.parametrize("form", ["sinkhorn_knopp", "sinkhorn_knopp_eps"])
def test_cpu_sinkhorn_takes_minus_infinity_and_keeps_nan_as_the_reference(form):
    """A -inf logit is an entry of 0 in log space (V4's form adds eps after the softmax, as
    the reference does); a NaN logit makes its matrix NaN, never a finite value that hides
    it."""
    logits = torch.randn(4, 4, 4)
    logits[0, 1, 2] = -float("inf")
    logits[2, 0, 0] = float("nan")
    logits[3, 1, 1] = -torch.tensor(float("nan"))  # its sign bit set: the largest pattern
    extra = (20,) if form == "sinkhorn_knopp" else (20, 1e-6)
    got = getattr(cpu_mhc, form)(logits, *extra)
    expected = getattr(reference, form)(logits, *extra)
    torch.testing.assert_close(got[:2], expected[:2], rtol=1e-5, atol=1e-6)
    assert form == "sinkhorn_knopp_eps" or got[0, 1, 2] == 0
    assert got[2:].isnan().any(-1).any(-1).all() and expected[2:].isnan().any(-1).any(-1).all()


def test_the_cpu_ops_refuse_what_their_kernels_cannot_index():
    """The custom ops are public (torch.ops.birkhoff.cpu_*): a tensor of another dtype, a
    non-contiguous one, mismatched shapes or no Sinkhorn iteration is refused, not read."""
    streams, h = torch.randn(5, 4, 8), torch.rand(5, 4)
    bad = [
        (cpu_mhc.stream_read, (streams.bfloat16(), h.bfloat16())),
        (cpu_mhc.stream_read, (streams.transpose(0, 1), h)),
        (cpu_mhc.stream_read, (streams, torch.rand(5, 3))),
        (cpu_mhc.stream_merge, (streams, torch.randn(5, 7), torch.rand(5, 4, 4), h)),
        (cpu_mhc.sinkhorn, (torch.randn(5, 4, 4), 0, 1e-6)),
        (cpu_mhc.sinkhorn, (torch.randn(5, 4, 3), 20, -1.0)),
        (cpu_mhc.mhc_tail, (torch.randn(5, 23), torch.rand(24), torch.rand(24), 4, 20, 0.0, -1.0)),
        (
            cpu_mhc_read.mhc_read_op,
            (streams, torch.randn(24, 31), *torch.rand(2, 24), 1e-6, 20, 0.0, -1.0),
        ),
        (
            cpu_mhc_read.mhc_read_op,
            (streams, torch.randn(24, 32), *torch.rand(2, 24), 1e-6, 0, 0.0, -1.0),
        ),
        (cpu_rows.rms_norm_op, (torch.randn(5, 8), torch.rand(7), 1e-6)),
        (cpu_rows.rms_norm_op, (torch.randn(5, 8).t(), torch.rand(5), 1e-6)),
        (cpu_rows.rms_norm_op, (torch.randn(5, 8, 2), torch.rand(2), 1e-6)),
    ]
    for op, args in bad:
        with pytest.raises(RuntimeError, match=r"cpu kernel|cpu rms_norm|Sinkhorn"):
            op(*args)


def test_a_link_failure_names_its_cause():
    stderr = (
        "/usr/bin/ld: cannot find -lgomp: No such file or directory\n"
        "collect2: error: ld returned 1 exit status\n"
    )
    cause = cpu_build._cause(stderr)
    assert cause.startswith("/usr/bin/ld: cannot find -lgomp") and "collect2: error" in cause


def test_a_compiler_given_other_arguments_builds_its_own_library(rebuild, monkeypatch):
    """CC's arguments are part of the cache key: `env cc` and `env cc -g` (the same compiler,
    another flag) each build a library of their own, where the second would have loaded the
    first's."""
    for cc in ("env cc", "env cc -g"):
        monkeypatch.setenv("CC", cc)
        cpu_build._build_or_reason.cache_clear()
        assert cpu_build.build_problem() is None
    built = sorted(path.name for path in (rebuild / "kernels").iterdir())
    assert len(built) == 2 and all(name.startswith("cpu_kernels_") for name in built), built


def test_a_compiler_named_with_arguments_is_found(monkeypatch):
    monkeypatch.setenv("CC", "env cc")  # as `ccache gcc` would be
    assert cpu_build.compiler()[1:] == ["cc"]
    monkeypatch.setenv("CC", "no-such-compiler -O1")
    assert cpu_build.compiler() is None
