"""The `npu` kernel backend without an Ascend device: every torch_npu call in
kernels/npu_ops.py against the signature documented in the torch_npu wheel paired with this
torch (torch_npu/_op_plugin_docs.py, read from the wheel, never imported: it needs CANN), and
the backend's ops run against a stand-in torch_npu that computes what those docs specify (and
records the calls), compared with the reference ops forward and backward, and as a model."""

from __future__ import annotations

import ast
import importlib.machinery
import re
import subprocess
import sys
import types
import zipfile
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from birkhoff import kernels
from birkhoff.kernels import npu_ops
from birkhoff.launch import doctor_kernels
from conftest import assert_backend_trains_as_reference

WHEELS = Path("~/.cache/birkhoff-test-wheels").expanduser()
USED = {
    "npu_rms_norm",
    "npu_rotary_mul",
    "npu_fusion_attention",
    "npu_grouped_matmul",
    "npu_swiglu",
}


@pytest.fixture(scope="module")
def op_docs() -> str:
    """_op_plugin_docs.py of the torch_npu wheel for this torch (fetched from the package
    registry once, kept in a cache outside the test's temporary dirs)."""
    version = torch.__version__.split("+")[0]
    found = sorted(WHEELS.glob(f"torch_npu-{version}-*.whl"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += ["--dest", str(WHEELS), f"torch_npu=={version}"]
        subprocess.run(command, check=True, timeout=600)
        found = sorted(WHEELS.glob(f"torch_npu-{version}-*.whl"))
    with zipfile.ZipFile(found[-1]) as wheel:
        return wheel.read("torch_npu/_op_plugin_docs.py").decode().replace("\r\n", "\n")


def documented(docs: str, name: str) -> tuple[list[str], set[str], set[str]]:
    """(positional parameters, those without a default, keyword-only parameters) of `name`'s
    signature line in the docs."""
    block = docs.split(f'_add_torch_npu_docstr(\n    "{name}",', 1)[1]
    line = re.search(rf"^(?:torch_npu\.)?{name}\((.*)\)\s*->", block, re.MULTILINE)
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
    tree = ast.parse(Path(npu_ops.__file__).read_text())
    return [
        node
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
        positional, required, keyword = documented(op_docs, call.func.attr)
        names = {k.arg for k in call.keywords}
        where = f"{call.func.attr} (npu_ops.py line {call.lineno})"
        assert len(call.args) <= len(positional), f"{where}: too many positional arguments"
        given = set(positional[: len(call.args)]) | names
        assert required <= given, f"{where}: missing {sorted(required - given)}"
        unknown = names - set(positional) - keyword
        assert not unknown, f"{where}: undocumented keywords {sorted(unknown)}"
        assert not (names & set(positional[: len(call.args)])), f"{where}: given twice"


class StandIn(types.ModuleType):
    """torch_npu as its docs specify the ops birkhoff calls, in plain torch; records every
    call."""

    def __init__(self) -> None:
        super().__init__("torch_npu")
        self.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
        self.calls: list[str] = []

    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        self.calls.append("npu_rms_norm")
        assert gamma.dtype == x.dtype  # "gamma: the same dtype as self"
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)
        return x * rstd * gamma, rstd

    def npu_rotary_mul(self, x, r1, r2, rotary_mode="half", rotate=None):
        self.calls.append("npu_rotary_mul")
        assert x.dim() == r1.dim() == r2.dim() == 4 and rotary_mode == "half"
        x1, x2 = x.chunk(2, dim=-1)
        return r1 * x + r2 * torch.cat((-x2, x1), dim=-1)

    def npu_fusion_attention(self, query, key, value, head_num, input_layout, *, atten_mask,
                             scale, keep_prob, sparse_mode):  # fmt: skip
        self.calls.append("npu_fusion_attention")
        assert input_layout == "BNSD" and head_num == query.shape[1] and sparse_mode == 0
        assert keep_prob == 1.0 and head_num % key.shape[1] == 0
        groups = head_num // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = scale * query @ key.transpose(-1, -2)  # atten_mask: True is hidden
        probs = scores.masked_fill(atten_mask, float("-inf")).softmax(-1)
        return probs @ value, None, None, None, 0, 0, 0

    def npu_grouped_matmul(self, x, weight, *, group_list, split_item, group_type,
                           group_list_type):  # fmt: skip
        self.calls.append("npu_grouped_matmul")
        assert (split_item, group_type, group_list_type) == (3, 0, 0)
        bounds = pairwise([0, *group_list.tolist()])
        rows = [x[0][a:b] @ weight[0][e] for e, (a, b) in enumerate(bounds)]
        return [torch.cat(rows)]

    def npu_swiglu(self, x, dim=-1):
        self.calls.append("npu_swiglu")
        a, b = x.chunk(2, dim=dim)  # "A and B: x split in two along dim"
        return a * torch.sigmoid(a) * b


@pytest.fixture
def stand_in(monkeypatch) -> StandIn:
    module = StandIn()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return module


def same(op: str, inputs: list, stand_in: StandIn) -> None:
    """The npu op (through the stand-in) against the reference: forward and the gradients of
    the floating-point tensor inputs (other arguments passed as they are)."""

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
    assert stand_in.calls, f"{op} did not call torch_npu"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, ref_leaves, grad)
    got_grads = torch.autograd.grad(got, npu_leaves, grad)
    for e, g in zip(expected_grads, got_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_npu_ops_match_the_reference_through_the_stand_in(stand_in):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 16)
    same("rms_norm", [x, torch.rand(16) + 0.5, 1e-6], stand_in)
    angles = torch.rand(6, 8) * 6
    same("rope", [x, angles.cos(), angles.sin()], stand_in)
    per_sequence = torch.rand(2, 6, 8) * 6  # packed documents: positions per sequence
    same("rope", [x, per_sequence.cos(), per_sequence.sin()], stand_in)
    q, kv = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    same("attention", [q, kv, kv.flip(-1)], stand_in)
    documents = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    documents[3:, :3] = False  # two documents of 3 tokens
    same("attention", [q, kv, kv.flip(-1), documents.expand(2, 1, 6, 6)], stand_in)
    counts = torch.tensor([3, 0, 5, 2])
    same("grouped_gemm", [torch.randn(10, 16), torch.randn(4, 16, 8), counts], stand_in)
    gate, up = 8 * torch.randn(10, 16), 8 * torch.randn(10, 16)  # beyond V4's clamp of 10
    same("swiglu", [gate, up, None], stand_in)
    same("swiglu", [gate, up, 10.0], stand_in)
    assert set(stand_in.calls) == USED


def test_doctor_checks_every_npu_op_against_the_reference(stand_in):
    """`birkhoff doctor --backend npu` has inputs for every op the backend runs, and through
    the stand-in each matches the float64 reference."""
    report = doctor_kernels.check_kernels("npu", torch.device("cpu"))
    assert set(report["ops"]) == {op for op, impl in kernels.implementations("npu").items()
                                  if impl == "npu"}  # fmt: skip
    for op, result in report["ops"].items():
        assert result["ok"], (op, result["problem"])
        assert result["forward_error"] < 1e-5 and result["backward_error"] < 1e-5, op


def test_a_model_on_the_npu_backend_trains_as_the_reference_one(stand_in):
    assert_backend_trains_as_reference("npu", seed=3)
    assert USED - {"npu_grouped_matmul"} <= set(stand_in.calls)  # (a dense model: no experts)


def test_the_npu_backend_is_available_only_where_torch_npu_imports(stand_in, monkeypatch):
    assert "npu" in kernels.available_backends()
    assert kernels.backend_for("auto", "npu") == "npu"
    monkeypatch.delitem(sys.modules, "torch_npu")
    assert "npu" not in kernels.available_backends()
    assert kernels.backend_for("auto", "npu") == "reference"
