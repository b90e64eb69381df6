"""The `npu` kernel backend without an Ascend device: every torch_npu call in
kernels/npu_ops.py against the signature documented in the torch_npu wheel paired with this
torch (torch_npu/_op_plugin_docs.py, read from the wheel, never imported: it needs CANN), and
the backend's ops run against a stand-in torch_npu that computes what those docs specify (and
records the calls), compared with the reference ops forward and backward, and as a model."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from npu_stand_in import HEAD_OPERATORS, MHC_OPERATORS, ROUTER_OPERATORS, StandIn

from birkhoff import kernels
from birkhoff.kernels import (
    npu_cross_entropy,
    npu_indexer_loss,
    npu_mhc,
    npu_ops,
    npu_router,
    npu_v4_attention,
)
from birkhoff.launch import doctor_kernels
from birkhoff.model.config import MoEConfig
from conftest import (
    assert_backend_trains_as_reference,
    assert_bf16_trains_as_reference,
    small_model,
)

WHEELS = Path("~/.cache/birkhoff-test-wheels").expanduser()
USED = {
    "npu_rms_norm",
    "npu_rotary_mul",
    "npu_fusion_attention",
    "npu_grouped_matmul",
    "npu_swiglu",
    "npu_moe_token_permute",
    "npu_moe_token_unpermute",
    *MHC_OPERATORS,
    *HEAD_OPERATORS,
    *ROUTER_OPERATORS,
    "npu_fusion_attention_v2",
    "npu_sparse_flash_attention",
    "npu_sparse_flash_attention_grad",
    "npu_sparse_lightning_indexer_grad_kl_loss",
}
# What the wheel's registered schemas (npu_native_functions_by_codegen.yaml) take that its
# docs do not describe; None: the docs have no entry for the op. Checked both ways: when the
# docs catch up, this test says so.
DOCS_BEHIND = {
    "npu_sparse_flash_attention": {"return_softmax_lse"},
    "npu_sparse_flash_attention_grad": None,
}


def wheel_file(name: str) -> str:
    """A file of the torch_npu wheel for this torch (fetched from the package registry once,
    kept in a cache outside the test's temporary dirs)."""
    version = torch.__version__.split("+")[0]
    found = sorted(WHEELS.glob(f"torch_npu-{version}-*.whl"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += ["--dest", str(WHEELS), f"torch_npu=={version}"]
        subprocess.run(command, check=True, timeout=600)
        found = sorted(WHEELS.glob(f"torch_npu-{version}-*.whl"))
    with zipfile.ZipFile(found[-1]) as wheel:
        return wheel.read(name).decode().replace("\r\n", "\n")


@pytest.fixture(scope="module")
def op_docs() -> str:
    """_op_plugin_docs.py of the torch_npu wheel for this torch."""
    return wheel_file("torch_npu/_op_plugin_docs.py")


def test_adamw_takes_the_fused_step_torch_npu_registers_for_ascend():
    """The trainer asks AdamW's fused step on npu devices (train/optim.py FUSED_DEVICES):
    torch_npu's wheel declares `_fused_adamw_` for its NPU dispatch key with aten's
    arguments, in order (the float learning rate's overload), and names its devices "npu"
    (torch's privateuse1 backend renamed, which torch's fused optimizers list whatever its
    name)."""
    from birkhoff.train.optim import FUSED_DEVICES

    header = wheel_file("torch_npu/include/torch_npu/csrc/aten/ops/_fused_adamw_npu_dispatch.h")
    declared = re.search(r"void _fused_adamw_\((.*?)\);", header, re.S).group(1)
    names = [re.split(r"[ &]", arg.split("=")[0].strip())[-1] for arg in declared.split(",")]
    schema = torch.ops.aten._fused_adamw_.default._schema
    assert names == [arg.name for arg in schema.arguments]
    assert "namespace npu" in header and "npu" in FUSED_DEVICES
    backend = wheel_file("torch_npu/_init/registry/backend.py")
    assert 'torch.utils.rename_privateuse1_backend("npu")' in backend


def documented(docs: str, name: str) -> tuple[list[str], set[str], set[str]]:
    """(positional parameters, those without a default, keyword-only parameters) of `name`'s
    signature line in the docs."""
    block = docs.split(f'_add_torch_npu_docstr(\n    "{name}",', 1)[1]
    line = re.search(rf"^(?:torch_npu\.|custom\.)?{name}\((.*)\)\s*->", block, re.MULTILINE)
    assert line, f"{name}: no signature line in the docs"
    positional, required, keyword = [], set(), set()
    star = False
    for param in (p.strip() for p in line.group(1).split(",")):
        if param == "*":
            star = True
            continue
        declared, _, default = param.partition("=")
        param_name = declared.split()[-1]
        (keyword.add(param_name) if star else positional.append(param_name))
        if not star and not default:
            required.add(param_name)
    return positional, required, keyword


def npu_calls() -> list[ast.Call]:
    """Every `_torch_npu().npu_*(...)` call in the backend's source."""
    modules = (npu_ops, npu_mhc, npu_cross_entropy, npu_router, npu_v4_attention, npu_indexer_loss)
    trees = [ast.parse(Path(m.__file__).read_text()) for m in modules]
    return [
        node
        for tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Call)
        and getattr(node.func.value.func, "id", None) == "_torch_npu"
    ]


def test_every_torch_npu_call_matches_its_documented_signature(op_docs):
    calls = npu_calls()
    assert {call.func.attr for call in calls} == USED
    for call in calls:
        behind = DOCS_BEHIND.get(call.func.attr, set())
        if behind is None:
            assert f'"{call.func.attr}",' not in op_docs, f"{call.func.attr}: now documented"
            continue
        positional, required, keyword = documented(op_docs, call.func.attr)
        assert_call_fits(call, positional, required, keyword, behind)


def test_every_torch_npu_call_matches_its_registered_schema():
    """Each call against the schema the wheel registers the op with (its codegen yaml,
    parsed by torch's own schema parser): what the compiled library accepts, where the docs
    describe an older signature or none."""
    declared = wheel_file("torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml")
    for call in npu_calls():
        name = call.func.attr
        lines = re.findall(rf"^- func: ({name}\(.*)$|^  func: ({name}\(.*)$", declared, re.M)
        assert lines, f"{name}: not registered by the wheel"
        schema = torch._C.parse_schema(next(filter(None, lines[0])))
        positional = [a.name for a in schema.arguments if not a.kwarg_only]
        keyword = {a.name for a in schema.arguments if a.kwarg_only}
        # an optional Tensor without a default is still given, as None if nothing
        required = {a.name for a in schema.arguments if not a.has_default_value()}
        assert_call_fits(call, positional, required, keyword)


def assert_call_fits(
    call: ast.Call, positional: list, required: set, keyword: set, extra: set = frozenset()
) -> None:
    """The call's positional arguments within `positional`, the `required` ones given, its
    keywords among the parameters (and `extra`, what the docs lag behind in), none twice."""
    names = {k.arg for k in call.keywords}
    where = f"{call.func.attr} (line {call.lineno})"
    assert len(call.args) <= len(positional), f"{where}: too many positional arguments"
    given = set(positional[: len(call.args)]) | names
    assert required <= given, f"{where}: missing {sorted(required - given)}"
    unknown = names - set(positional) - keyword
    assert unknown == set(extra), f"{where}: undocumented keywords {sorted(unknown)}"
    assert not (names & set(positional[: len(call.args)])), f"{where}: given twice"


def same(op: str, inputs: list, stand_in: StandIn | None) -> None:
    """The npu op (through the stand-in; None: not expected to call it) against the
    reference: forward and the gradients of the floating-point tensor inputs (other arguments
    passed as they are)."""

    def copies() -> tuple[list, list[torch.Tensor]]:
        args = [
            t.detach().clone().requires_grad_(t.is_floating_point())
            if isinstance(t, torch.Tensor)
            else t
            for t in inputs
        ]
        return args, [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    (ref_args, ref_leaves), (npu_args, npu_leaves) = copies(), copies()
    expected = kernels.get(op, "reference")(*ref_args)
    got = kernels.get(op, "npu")(*npu_args)
    assert stand_in is None or stand_in.calls, f"{op} did not call torch_npu"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    expected = expected if isinstance(expected, tuple) else (expected,)  # rope: (q, k)
    got = got if isinstance(got, tuple) else (got,)
    grads = [torch.randn_like(e) for e in expected]
    expected_grads = torch.autograd.grad(expected, ref_leaves, grads)
    got_grads = torch.autograd.grad(got, npu_leaves, grads)
    for e, g in zip(expected_grads, got_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_npu_ops_match_the_reference_through_the_stand_in(stand_in):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 16)
    same("rms_norm", [x, torch.rand(16) + 0.5, 1e-6], stand_in)
    angles = torch.rand(6, 8) * 6
    keys = torch.randn(2, 6, 2, 16)  # grouped: fewer heads
    same("rope", [x, keys, angles.cos(), angles.sin()], stand_in)
    per_sequence = torch.rand(2, 6, 8) * 6  # packed documents: positions per sequence
    same("rope", [x, keys, per_sequence.cos(), per_sequence.sin()], stand_in)
    # V4's RoPE on the last 8 of 16 channels: per-sequence angles (a call per sequence), one
    # table for every sequence (one call), a 3-d x (the KV entry), turned back
    per_token = per_sequence[..., :4, None].transpose(-1, -2)  # (2, 6, 1, 4)
    same("rope_trailing", [x, per_token.cos(), per_token.sin()], stand_in)
    shared = angles[None, :, None, :4]
    same("rope_trailing", [x, shared.cos(), shared.sin(), True], stand_in)
    same("rope_trailing", [x, per_token.cos(), per_token.sin(), False, 0.5], stand_in)  # normed
    entry = torch.randn(2, 6, 16)
    same("rope_trailing", [entry, per_sequence[..., :4].cos(), per_sequence[..., :4].sin()],
         stand_in)  # fmt: skip
    q, kv = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    same("attention", [q, kv, kv.flip(-1)], stand_in)
    documents = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    documents[3:, :3] = False  # two documents of 3 tokens
    same("attention", [q, kv, kv.flip(-1), documents.expand(2, 1, 6, 6)], stand_in)
    ends = torch.tensor([3, 0, 5, 2]).cumsum(0, dtype=torch.int32)  # an empty expert too
    same("grouped_gemm", [torch.randn(10, 16), torch.randn(4, 16, 8), ends], stand_in)
    gate, up = 8 * torch.randn(10, 16), 8 * torch.randn(10, 16)  # beyond V4's clamp of 10
    same("swiglu", [gate, up, None], stand_in)
    same("swiglu", [gate, up, 10.0], stand_in)
    assert (
        set(stand_in.calls)
        == USED - MOE_OPS - MHC_OPERATORS - HEAD_OPERATORS - ROUTER_OPERATORS - V4_OPERATORS
    )


MOE_OPS = {"npu_moe_token_permute", "npu_moe_token_unpermute"}
V4_OPERATORS = {  # V4 attention's (blocks of the window and entries, CSA's gathered picks)
    "npu_fusion_attention_v2",  # and its indexer's loss: tests/test_indexer_loss.py
    "npu_sparse_flash_attention",
    "npu_sparse_flash_attention_grad",
    "npu_sparse_lightning_indexer_grad_kl_loss",
}


def test_npu_moe_permutation_runs_for_bfloat16_and_falls_back_otherwise(stand_in):
    """torch_npu's token permute/unpermute take bfloat16 only: bf16 tokens go through them
    (same rows and order as the reference, gradients within bf16 rounding); float32 runs
    the reference, no torch_npu call, and the tables say so."""
    torch.manual_seed(1)
    tokens, top_k, experts = 9, 3, 5
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    x = torch.randn(tokens, 16, dtype=torch.bfloat16)
    gate_weights, grad = torch.rand(tokens, top_k), torch.randn(tokens, 16, dtype=torch.bfloat16)
    results = []
    for backend in ("reference", "npu"):
        leaf = x.clone().requires_grad_()
        permuted, order, counts = kernels.get("moe_permute", backend)(leaf, ids, experts)
        weights = gate_weights.clone().requires_grad_()  # float32, as the router gives them
        rows = (permuted * 1.5).detach().requires_grad_()
        merged = kernels.get("moe_unpermute", backend)(rows, order, weights, tokens)
        grads = torch.autograd.grad((permuted, merged), (leaf, rows, weights), (rows, grad))
        results.append((permuted, order.long(), counts, merged, *grads))
    assert set(stand_in.calls) == MOE_OPS
    (p_ref, o_ref, c_ref, *rest_ref), (p_npu, o_npu, c_npu, *rest_npu) = results
    assert torch.equal(p_npu, p_ref) and torch.equal(o_npu, o_ref) and torch.equal(c_npu, c_ref)
    for expected, got in zip(rest_ref, rest_npu, strict=True):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=2e-2)  # bf16 sums
    stand_in.calls.clear()
    same("moe_unpermute", [torch.randn(tokens * top_k, 16), o_ref, torch.rand(tokens, top_k),
                           tokens], stand_in=None)  # fmt: skip
    assert stand_in.calls == []
    assert kernels.dtypes_of("moe_permute", "npu") == (torch.bfloat16,)
    bf16 = kernels.implementations("npu", torch.bfloat16)
    assert bf16["moe_permute"] == bf16["moe_unpermute"] == "npu"
    fp32 = kernels.implementations("npu", torch.float32)
    assert fp32["moe_permute"] == fp32["moe_unpermute"] == "reference"
    line = kernels.describe("npu", torch.float32)
    fallen = "fall back to reference: engram_gather_gate, engram_hash, entry_mass, "
    fallen += "indexer_loss (bfloat16 or float16 only; 8 to 128 heads of 512 channels and 8 to 64 "
    fallen += "indexer heads of 128 (powers of two), up to 131,072 tokens, more tokens than "
    fallen += "entries), "
    fallen += "kv_compress, linear_cross_entropy (bfloat16 or float16 only; vocabularies of 128 "
    fallen += "entries or more),"
    only = "bfloat16 or float16 residual streams only"
    read = f"({only}; V4's form, 4, 6 or 8 streams, <= 65,536 tokens)"
    assert f"{fallen} mhc_mapping, mhc_merge_read {read}, mhc_post ({only}" in line
    assert line.endswith(
        "moe_permute (bfloat16 only), moe_unpermute (bfloat16 only), sinkhorn_knopp"
    )
    bf16_line = kernels.describe("npu", torch.bfloat16)
    own = "npu for 16 of 24 ops (attention, engram_merge, grouped_gemm, indexer_loss (bfloat16 "
    own += "or float16 only; 8 to 128 heads of 512 channels and 8 to 64 indexer heads of 128 "
    own += "(powers of two), up to 131,072 tokens, more tokens than entries), linear_cross_entropy "
    own += "(bfloat16 or float16 only; vocabularies of 128 entries or more), mhc_merge_read"
    assert f"{own} {read}" in bf16_line


def test_doctor_checks_every_npu_op_against_the_reference(stand_in):
    """`birkhoff doctor --backend npu` has inputs for every op the backend runs, and through
    the stand-in each matches the float64 reference."""
    report = doctor_kernels.check_kernels("npu", torch.device("cpu"))
    assert set(report["ops"]) == {op for op, impl in kernels.implementations("npu").items()
                                  if impl == "npu"}  # fmt: skip
    for op, result in report["ops"].items():
        assert result["ok"], (op, result["problem"])
        bound = 1e-2 if kernels.dtypes_of(op, "npu") else 1e-5  # bf16-only ops: checked in bf16
        assert result["forward_error"] < bound, op
        if op == "engram_merge":  # the reference's gate in float32: its own error (sqrt|s|)
            bound = 1.01 * result["reference_own_precision_error"]
        assert result["backward_error"] < bound, op
    assert report["ops"]["moe_permute"]["note"].startswith("runs for torch.bfloat16 inputs only")
    # V4 attention's further bfloat16 call gathers CSA's picks: the sparse operator's path
    assert {"npu_sparse_flash_attention", "npu_sparse_flash_attention_grad"} <= set(stand_in.calls)
    attention = report["ops"]["v4_attention"]
    assert 0 < attention["half_precision_error"] < doctor_kernels.LIMITED_TOLERANCE
    assert "1 further call(s) in bfloat16 or float16, held to 0.01" in attention["note"]


def test_a_model_on_the_npu_backend_trains_as_the_reference_one(stand_in):
    assert_backend_trains_as_reference("npu", seed=3)
    # a dense float32 model: no experts, and no bfloat16 for the MoE permutation
    # (and a vocabulary under the fused head's 128, float32 for it anyway)
    unused = {"npu_grouped_matmul"} | MOE_OPS | MHC_OPERATORS | HEAD_OPERATORS | ROUTER_OPERATORS
    unused |= V4_OPERATORS
    assert USED - unused <= set(stand_in.calls)


def test_the_npu_backend_is_available_only_where_torch_npu_imports(stand_in, monkeypatch):
    assert "npu" in kernels.available_backends()
    assert kernels.backend_for("auto", "npu") == "npu"
    monkeypatch.delitem(sys.modules, "torch_npu")
    assert "npu" not in kernels.available_backends()
    assert kernels.backend_for("auto", "npu") == "reference"


@pytest.mark.parametrize("residual", ["mhc", "plain"])
def test_a_moe_model_in_bfloat16_permutes_through_torch_npu(stand_in, residual):
    """Under train.mixed_precision=bf16's autocast a MoE model on the npu backend permutes
    through torch_npu (mHC's tokens reach the MoE in bfloat16, a plain residual stream's in
    float32, which the MoE casts for its experts on every backend), routes through its gating
    operator (sigmoid scores) and, with a vocabulary of 160, takes its loss from the fused
    head (a plain stream's float32 hidden states cast the same way); loss and gradients as
    the reference's within bf16 rounding."""
    from birkhoff.model.config import ResidualConfig

    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=8, first_k_dense=1)
    form = {"residual": ResidualConfig(mode="plain", form="paper")} if residual == "plain" else {}
    cfg = small_model(max_seq_len=16, moe=moe, vocab_size=160, **form)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    assert_bf16_trains_as_reference("npu", cfg, tokens)
    assert set(stand_in.calls) >= MOE_OPS | HEAD_OPERATORS | ROUTER_OPERATORS
