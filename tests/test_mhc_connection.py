"""A hyper-connection (read, a sublayer, merge) on the cpu and triton backends' ops against the
reference's in float64, every gradient: their `mhc_read` hands back the streams the merge
takes, so that the merge's gradient of them is added in the read's backward pass
(kernels/cpu_mhc_read.py, kernels/triton_mhc_read.py, interpreted here);
also with the streams and the mappings used elsewhere too, a second merge, a merge output with
no gradient, and a backward run twice."""

from __future__ import annotations

import pytest
import torch
from test_cpu_kernels import read_inputs

from birkhoff import kernels
from birkhoff.kernels import cpu_mhc, cpu_mhc_read, reference
from conftest import assert_within_own_error

OPS = {
    "reference": (reference.mhc_read, reference.mhc_post),
    "cpu": (cpu_mhc_read.mhc_read, cpu_mhc.mhc_post),
    "triton": (kernels.get("mhc_read", "triton"), kernels.get("mhc_post", "triton")),
}
FUSED = ["cpu", "triton"]
READ_NODE = {"cpu": "ReadPassingStreams", "triton": "_ReadBackward"}


def inputs(n: int, c: int, tokens: int) -> list[torch.Tensor]:
    """The read's inputs (streams (2, tokens, n, c) first), then a sublayer weight."""
    return [*read_inputs(n, c, tokens), torch.randn(c, c) / c**0.5]


def connection(backend: str, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """x' = merge(read(x), tanh(read(x) W)): (x', the read's outputs)."""
    read, post = OPS[backend]
    *mapping, sublayer = leaves
    layer_in, h_post, h_res, passed = read(*mapping, 1e-6, 20, 1e-6)
    merged = post(passed, torch.tanh(layer_in @ sublayer), h_res, h_post)
    return merged, layer_in, h_post, h_res, passed


def gradients(backend: str, tensors, dtype, loss_of) -> tuple[torch.Tensor, ...]:
    leaves = [t.to(dtype).requires_grad_() for t in tensors]
    outputs = connection(backend, leaves)
    return torch.autograd.grad(loss_of(*outputs), leaves, allow_unused=True)


def weighted(t: torch.Tensor, seed: int) -> torch.Tensor:
    """sum(t * r) with r fixed by the seed, in t's dtype."""
    r = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (t * r.to(t.dtype)).sum()


def assert_matches_reference(backend, tensors, loss_of) -> None:
    """The backend's gradients against float64, within twice the float32 reference's own
    error (at least 1e-5), element by element."""
    exact = gradients("reference", tensors, torch.float64, loss_of)
    own = gradients("reference", tensors, torch.float32, loss_of)
    got = gradients(backend, tensors, torch.float32, loss_of)
    for i, (e, o, g) in enumerate(zip(exact, own, got, strict=True)):
        if e is None:
            assert g is None or not g.any(), i
            continue
        assert_within_own_error(g, o, e, f"input {i}")


# n = 4 (tiles and a tail of columns), 3 and 1 (tails only), 2 (K = 8), 6 (the merge's loops
# for more than 4 streams, K = 48)
@pytest.mark.parametrize(
    ("n", "c", "tokens"), [(4, 96, 37), (3, 40, 5), (1, 24, 16), (2, 80, 9), (6, 72, 7)]
)
@pytest.mark.parametrize("backend", FUSED)
def test_a_hyper_connection_on_the_fused_ops_matches_the_reference(backend, n, c, tokens):
    """The merge takes the streams through the read's node (so its gradient of them reaches
    the read's backward) and every gradient (the streams, the projection, alpha, the biases,
    the sublayer) is the reference's."""
    torch.manual_seed(n + c)
    tensors = inputs(n, c, tokens)
    passed = connection(backend, [t.clone().requires_grad_() for t in tensors])[-1]
    node = passed.grad_fn  # the read's node, or a view of its output (cpu: of a reshape)
    if type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    assert READ_NODE[backend] in type(node).__name__
    assert_matches_reference(backend, tensors, lambda merged, *_: weighted(merged, 1))


@pytest.mark.parametrize("backend", FUSED)
def test_streams_and_h_res_used_elsewhere_too_add_their_gradients(backend):
    """The passed streams and the mappings also feed the loss directly: their gradients from
    there join the merge's in the read's backward."""
    torch.manual_seed(3)

    def loss(merged, layer_in, h_post, h_res, passed):
        return weighted(merged, 1) + weighted(passed, 2) + weighted(h_res, 3) + weighted(h_post, 4)

    assert_matches_reference(backend, inputs(4, 96, 19), loss)


@pytest.mark.parametrize("backend", FUSED)
def test_a_merge_output_without_gradient_leaves_the_read_its_own(backend):
    """Only the read's outputs feed the loss: the merge's backward never runs, and the read's
    backward gets no gradient of the streams to add."""
    torch.manual_seed(4)
    assert_matches_reference(
        backend, inputs(4, 32, 19), lambda merged, layer_in, h_post, h_res, _: weighted(layer_in, 5)
    )


@pytest.mark.parametrize("backend", FUSED)
def test_two_merges_of_the_same_streams_add_both_gradients(backend):
    """Two merges of the passed streams (one with a copy of H_res): the read's backward gets
    their gradients of the streams summed, and every gradient is the reference's."""
    torch.manual_seed(5)

    tensors = inputs(4, 32, 19)

    def twice(backend: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        leaves = [t.to(dtype).requires_grad_() for t in tensors]
        read, post = OPS[backend]
        *mapping, sublayer = leaves
        layer_in, h_post, h_res, passed = read(*mapping, 1e-6, 20, 1e-6)
        out = torch.tanh(layer_in @ sublayer)
        merges = [post(passed, out, h_res, h_post), post(passed, out, h_res * 1.0, h_post)]
        return torch.autograd.grad(sum(weighted(m, s) for s, m in enumerate(merges)), leaves)

    runs = [twice("reference", torch.float64), twice("reference", torch.float32)]
    runs.append(twice(backend, torch.float32))
    for i, (e, o, g) in enumerate(zip(*runs, strict=True)):
        assert_within_own_error(g, o, e, f"input {i}")


@pytest.mark.parametrize("backend", FUSED)
def test_a_backward_run_twice_accumulates_twice(backend):
    """retain_graph and a second backward: the accumulated gradients are twice one
    backward's (a backward that wrote into what the graph keeps, the saved streams or
    mappings, or into a gradient it was handed, would change the second)."""
    torch.manual_seed(6)
    leaves = [t.requires_grad_() for t in inputs(4, 32, 19)]
    loss = weighted(connection(backend, leaves)[0], 1)
    loss.backward(retain_graph=True)
    once = [t.grad.clone() for t in leaves]
    loss.backward()
    for t, g in zip(leaves, once, strict=True):
        torch.testing.assert_close(t.grad, 2 * g)
