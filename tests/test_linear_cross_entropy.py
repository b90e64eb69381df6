"""The head's matmul and cross-entropy as one chunked op (kernels/linear_cross_entropy.py),
against F.cross_entropy of the whole logits (in float64 as the oracle, and as the model
computed it before under bf16 autocast); liger-kernel's op (the triton backend) under
Triton's interpreter; the memory it saves, from the allocator's peak."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from birkhoff import kernels
from birkhoff.kernels import linear_cross_entropy as chunked
from birkhoff.model import build_model
from birkhoff.parallel.memory import AllocatedPeak
from conftest import small_model

TOKENS, HIDDEN, VOCAB = 37, 16, 101


def inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, dtype=dtype, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, dtype=dtype, requires_grad=True)
    return hidden, weight, torch.randint(0, VOCAB, (TOKENS,))


def whole_logits_loss(hidden, weight, targets, chunk=None):  # the path the op replaces
    logits = hidden @ weight.T
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)


@pytest.mark.parametrize("chunk", [1, 5, TOKENS, 4 * TOKENS])
def test_chunked_loss_and_gradients_match_the_whole_logits(chunk):
    hidden, weight, targets = inputs()
    expected = F.cross_entropy(hidden @ weight.T, targets)
    expected_grads = torch.autograd.grad(0.3 * expected, (hidden, weight))
    got = kernels.get("linear_cross_entropy")(hidden, weight, targets, chunk)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)
    for g, e in zip(torch.autograd.grad(0.3 * got, (hidden, weight)), expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)


def test_under_bf16_autocast_it_computes_what_the_head_and_cross_entropy_did():
    """One chunk: the former path's gradients bit for bit (the matmuls in bf16, the softmax
    in float32) and its loss to float32 rounding (summed in another order); several chunks:
    the weight gradient summed over chunks in float32, within bf16 rounding."""
    hidden, weight, targets = (t.detach().float() if t.is_floating_point() else t for t in inputs())
    results = {}
    for name, loss_of, chunk in [
        ("before", whole_logits_loss, None),
        ("one chunk", kernels.get("linear_cross_entropy"), TOKENS),
        ("chunks", kernels.get("linear_cross_entropy"), 8),
    ]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(h, w, targets, chunk)
        results[name] = (loss, *torch.autograd.grad(loss, (h, w)))
    (loss, *grads), (expected_loss, *expected_grads) = results["one chunk"], results["before"]
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    for got, expected in zip(grads, expected_grads, strict=True):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    for got, expected in zip(results["chunks"], results["before"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-4)


def test_without_gradients_the_loss_is_the_same():
    hidden, weight, targets = inputs(torch.float32)
    with torch.no_grad():
        loss = kernels.get("linear_cross_entropy")(hidden, weight, targets, 4)
    assert loss.grad_fn is None
    expected = F.cross_entropy(hidden.detach().double() @ weight.detach().double().T, targets)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)


def test_the_logits_are_never_whole():
    """Peak allocation of a forward and backward: the chunked op holds one chunk's float32
    logits (reused for their gradient), the weight's and the hidden states' gradients; the
    whole-logits path holds the (tokens, vocab) logits and their log-softmax at least."""
    tokens, hidden_size, vocab, chunk = 1024, 32, 16384, 128
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    peaks = {}
    for name, loss_of in [("chunked", kernels.get("linear_cross_entropy")), ("whole", None)]:
        with AllocatedPeak(torch.device("cpu")) as allocated:
            if loss_of is None:
                loss = whole_logits_loss(hidden, weight, targets)
            else:
                loss = loss_of(hidden, weight, targets, chunk)
            loss.backward()
        hidden.grad = weight.grad = None
        peaks[name] = allocated.peak_bytes
    logits_chunk = chunk * vocab * 4
    gradients = (vocab + tokens) * hidden_size * 4
    assert peaks["chunked"] <= logits_chunk + 2 * gradients + 64 * 1024  # and small tensors
    assert peaks["whole"] >= 2 * tokens * vocab * 4  # 16x the chunked op's peak here
    assert peaks["whole"] > 10 * peaks["chunked"]


def test_the_model_trains_through_it_as_through_its_logits(monkeypatch):
    """The model's loss and every parameter's gradient, with the loss in chunks of 7 tokens
    (MTP depth 1: the shared head's second loss too), against F.cross_entropy of the logits
    the same model computes."""
    from birkhoff.model.config import MTPConfig

    monkeypatch.setattr(chunked, "LOGITS_CHUNK_BYTES", 7 * 4 * 50)  # 7 tokens of 50 logits
    cfg = small_model(vocab_size=50, max_seq_len=12, mtp=MTPConfig(1, 0.5))
    torch.manual_seed(0)
    model = build_model(cfg).double()
    tokens, targets = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))

    def loss_and_grads():
        model.zero_grad()
        loss = model(tokens, targets)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    got, got_grads = loss_and_grads()
    monkeypatch.setattr(model, "_linear_loss", whole_logits_loss)
    expected, expected_grads = loss_and_grads()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_liger_kernel_matches_the_reference_under_autocast():
    """The triton backend's op is liger-kernel's (interpreted here): float32 to 1e-6 of the
    float64 reference, and under bf16 autocast within bf16 rounding of the reference."""
    pytest.importorskip("liger_kernel")
    assert kernels.implementations("triton")["linear_cross_entropy"] == "triton"
    liger, reference = (
        kernels.get("linear_cross_entropy", "triton"),
        kernels.get("linear_cross_entropy"),
    )
    hidden, weight, targets = inputs()
    expected = reference(hidden, weight, targets)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    got = liger(h, w, targets)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    for g, e in zip(torch.autograd.grad(got, (h, w)), expected_grads, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6)
    results = []
    for loss_of in (reference, liger):
        h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(h, w, targets)
        results.append((loss, *torch.autograd.grad(loss, (h, w))))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=2e-3)


@pytest.mark.parametrize(("chunk", "chunks"), [(16, 4), (32, 2), (64, 1), (None, 1), ("16", 4)])
def test_liger_kernel_takes_the_reference_s_chunks(chunk, chunks, monkeypatch):
    """liger's op chunks its 64 tokens as the reference would, `chunk` tokens at a time (its
    cross-entropy kernel launched once a chunk), and by default within the reference's logits
    budget (also patched to 16 tokens' logits); liger's own default is ceil(vocab / hidden) =
    8 chunks whatever the tokens. The loss and gradients against the whole logits in float64."""
    pytest.importorskip("liger_kernel")
    from birkhoff.kernels.launch_counter import LaunchCounter

    if chunk == "16":
        monkeypatch.setattr(chunked, "LOGITS_CHUNK_BYTES", 16 * 4 * 256)
        chunk = None
    torch.manual_seed(0)
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(256, 32, requires_grad=True)
    targets = torch.randint(0, 256, (64,))
    counter = LaunchCounter()
    with counter, counter.triton():
        loss = kernels.get("linear_cross_entropy", "triton")(hidden, weight, targets, chunk)
    assert counter.by_name["triton.liger_cross_entropy_kernel"] == chunks
    expected = whole_logits_loss(hidden.double(), weight.double(), targets)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    got = torch.autograd.grad(loss, (hidden, weight))
    for g, e in zip(got, torch.autograd.grad(expected, (hidden, weight)), strict=True):
        torch.testing.assert_close(g, e.float(), rtol=1e-5, atol=1e-6)


def test_its_backward_can_run_twice():
    """A pipeline's zero-bubble schedule differentiates the inputs, then the weights, through
    the same graph: both passes give the gradients one pass gives."""
    hidden, weight, targets = inputs()
    expected = torch.autograd.grad(
        0.5 * whole_logits_loss(hidden, weight, targets), (hidden, weight)
    )
    loss = 0.5 * kernels.get("linear_cross_entropy")(hidden, weight, targets, 8)
    (grad_hidden,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (grad_weight,) = torch.autograd.grad(loss, weight)
    for got, want in zip((grad_hidden, grad_weight), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
