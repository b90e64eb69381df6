"""The cpu backend's linear_cross_entropy (kernels/cpu_cross_entropy.py: the chunked op with
each chunk's softmax, loss and logit gradient in C) against F.cross_entropy of the whole
logits in float64, with and without gradients, under bf16 autocast against the reference op,
at extreme logits; its row op through opcheck and refusing targets outside the vocabulary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from birkhoff import kernels
from birkhoff.kernels.cpu_cross_entropy import cross_entropy_rows_op

TOKENS, HIDDEN = 37, 16


def inputs(vocab: int, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(vocab)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator) * scale
    weight = torch.randn(vocab, HIDDEN, generator=generator)
    targets = torch.randint(0, vocab, (TOKENS,), generator=generator)
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def oracle(hidden, weight, targets):
    """The loss and its gradients through the whole logits, in float64."""
    h, w = (t.detach().double().requires_grad_() for t in (hidden, weight))
    loss = F.cross_entropy(h @ w.T, targets)
    return loss, *torch.autograd.grad(loss, (h, w))


@pytest.mark.parametrize(("vocab", "chunk"), [(101, 5), (101, TOKENS), (4096, 8), (7, 3)])
def test_loss_and_gradients_match_the_whole_logits_in_float64(vocab, chunk):
    """Vocabularies below, across and over the kernel's 16 lanes; several chunks and one."""
    hidden, weight, targets = inputs(vocab)
    loss = kernels.get("linear_cross_entropy", "cpu")(hidden, weight, targets, chunk)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected, *expected_grads = oracle(hidden, weight, targets)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-7)


def test_without_gradients_the_loss_is_the_same():
    hidden, weight, targets = inputs(101)
    with torch.no_grad():
        loss = kernels.get("linear_cross_entropy", "cpu")(hidden, weight, targets, 4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss.double(), oracle(hidden, weight, targets)[0], rtol=2e-6, atol=0)


def test_extreme_logits_stay_finite():
    """Logits in the thousands (each row's maximum is subtracted before the exp): the loss and
    gradients where float64 has them, to the float32 matmuls' rounding (relative to the largest
    gradient: the reference's own error is 3e-6 of it here)."""
    hidden, weight, targets = inputs(101, scale=300.0)
    loss = kernels.get("linear_cross_entropy", "cpu")(hidden, weight, targets, 16)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected, *expected_grads = oracle(hidden, weight, targets)
    assert expected.abs() > 100 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        assert (got.double() - want).abs().max() < 2e-5 * want.abs().max()


def test_each_row_s_loss_and_gradient_wherever_its_largest_logit_lies():
    """The row op against log_softmax in float64, on rows whose maximum (1,000 above the
    rest, so a missed maximum overflows the exp) sits at the first logit, inside the 16-lane
    body and in the tail past it (V = 37: two full lane blocks and 5 more)."""
    vocab, count = 37, 10
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1)) * 3
    for row, column in enumerate((0, 20, 35, 36)):
        logits[row, column] += 1000.0
    targets = torch.tensor([0, 3, 35, 36])
    expected = -torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
    expected_grad = torch.softmax(logits.double(), -1)
    expected_grad[torch.arange(4), targets] -= 1.0
    grad = logits.clone()
    losses = cross_entropy_rows_op(grad, targets, count, True)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad / count, rtol=1e-5, atol=1e-7)
    kept = logits.clone()
    assert torch.equal(cross_entropy_rows_op(kept, targets, count, False), losses)
    assert torch.equal(kept, logits)  # without the gradient the logits are left as they were


def test_under_bf16_autocast_it_computes_what_the_reference_computes():
    """The matmuls in bf16 as the reference's (autocast), the softmax in float32: the loss to
    float32 rounding, the gradients within bf16 rounding."""
    hidden, weight, targets = inputs(101)
    results = []
    for backend in ("reference", "cpu"):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = kernels.get("linear_cross_entropy", backend)(h, w, targets, 8)
        results.append((loss, *torch.autograd.grad(loss, (h, w))))
    (loss, *grads), (expected, *expected_grads) = results[1], results[0]
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-4)


def test_float64_runs_the_reference():
    assert kernels.implementations("cpu", torch.float64)["linear_cross_entropy"] == "reference"
    assert kernels.implementations("cpu", torch.float32)["linear_cross_entropy"] == "cpu"


def test_the_row_op_checks_its_targets_and_passes_opcheck():
    logits = torch.randn(4, 21)
    with pytest.raises(RuntimeError, match="outside the vocabulary of 21"):
        cross_entropy_rows_op(logits.clone(), torch.tensor([0, 3, 21, 1]), 4, True)
    with pytest.raises(RuntimeError, match="4 int64 targets"):
        cross_entropy_rows_op(logits.clone(), torch.tensor([0, 3, 2], dtype=torch.int64), 4, True)
    targets = torch.tensor([0, 20, 5, 5])
    torch.library.opcheck(cross_entropy_rows_op, (logits.clone(), targets, 4, True))
    torch.library.opcheck(cross_entropy_rows_op, (logits.clone(), targets, 4, False))
