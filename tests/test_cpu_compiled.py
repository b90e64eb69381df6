"""The cpu backend under torch.compile: each op's traced code calls its C kernels' custom ops
(torch.ops.birkhoff.cpu_*) in the forward and the backward graph, where compiled blocks
once traced the reference's expressions instead, and matches the float64 reference as
`birkhoff doctor` holds the eager op to it (its example inputs and tolerance)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

from birkhoff import kernels
from birkhoff.launch import doctor_kernels as doctor

# AotEagerAndRecordGraphs' compiler takes its arguments unboxed, and torch says so each time
pytestmark = pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
CPU_OPS = sorted(op for op, impl in kernels.implementations("cpu").items() if impl == "cpu")
TOKENS = 24  # small: what is checked is the traced path, not the kernels' arithmetic


# The head's loss computes its gradients in the forward (kernels/linear_cross_entropy.py):
# its backward graph only scales them.
GRADIENTS_IN_FORWARD = {"linear_cross_entropy"}


def birkhoff_ops(graphs: list[torch.fx.GraphModule]) -> set[str]:
    """The birkhoff custom ops the graphs call, directly or, for an op that writes its
    inputs, through functionalization's wrapper (whose first argument is the op)."""
    called = set()
    for graph in graphs:
        for node in graph.graph.nodes:
            if node.op != "call_function":
                continue
            wrapped = "auto_functionalized" in str(node.target)
            called.add(str(node.args[0] if wrapped else node.target).removesuffix(".default"))
    return {name for name in called if name.startswith("birkhoff.")}


def test_the_cpu_backend_runs_sixteen_ops():
    assert len(CPU_OPS) == 16, CPU_OPS


@pytest.mark.parametrize("op", CPU_OPS)
def test_a_compiled_op_calls_its_kernels_and_matches_the_reference(op):
    torch._dynamo.reset()
    torch.manual_seed(0)
    inputs = doctor.EXAMPLES[op](TOKENS)
    constants = doctor.CONSTANT_ARGS.get(op, ())
    backward = op not in doctor.NO_BACKWARD
    exact, exact_leaves = doctor.leaf_copies(inputs, torch.float64, backward, constants)
    expected = doctor.as_tuple(kernels.get(op)(*exact))
    targets = [e for e in expected if e.requires_grad]
    grads = [torch.randn_like(e) for e in targets]
    expected_grads = torch.autograd.grad(targets, exact_leaves, grads)

    recorded = AotEagerAndRecordGraphs()
    compiled = torch.compile(kernels.get(op, "cpu"), backend=recorded, fullgraph=True)
    errors = doctor._errors(compiled, inputs, expected, grads, expected_grads, constants)
    # the float32 reference's own error: an ill-conditioned op is held to a multiple of it
    own = doctor._errors(kernels.get(op), inputs, expected, grads, expected_grads, constants)
    tolerance = max(doctor.TOLERANCE, doctor.CONDITIONING_FACTOR * max(own))
    assert max(errors) <= tolerance, (errors, own)

    # each graph calls C kernels only (rope's backward is the rotation inverted)
    forward, backward_ops = birkhoff_ops(recorded.fw_graphs), birkhoff_ops(recorded.bw_graphs)
    assert forward and all(name.startswith("birkhoff.cpu_") for name in forward), forward
    if op in GRADIENTS_IN_FORWARD:
        assert not backward_ops, backward_ops
    else:
        assert backward_ops and all(n.startswith("birkhoff.cpu_") for n in backward_ops)
