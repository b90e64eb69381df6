"""Softmax attention in parts joined by their log-sum-exps with a sink (kernels/lse_merge.py):
against one softmax over all the keys and the sink (float64, gradients of every input), its
written-out backward against numerical differentiation, and what autograd keeps for it."""

from __future__ import annotations

import torch

from birkhoff.kernels.lse_merge import merge_softmax_parts

B, T, H, D = 2, 5, 3, 4


def attention_part(q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor):
    """Softmax attention over `keys` (= values), (B, T, H, D) and (B, T, H): zero and -inf
    where a query has no allowed key."""
    scores = torch.einsum("bthd,bkd->bthk", q, keys).masked_fill(~allowed[:, :, None], -torch.inf)
    lse = scores.logsumexp(-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num()
    return torch.einsum("bthk,bkd->bthd", probs, keys), lse


def test_the_joined_parts_equal_one_softmax_over_every_key_and_the_sink():
    """Two sets of keys (the second unseen by the first two queries, as entries before the
    first complete block) and a sink: output, log-sum-exp, and the gradients of the queries,
    both sets of keys and the sinks, against one softmax with the sink as a key of value 0."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    first = torch.randn(B, 6, D, generator=g, dtype=torch.float64, requires_grad=True)
    second = torch.randn(B, 3, D, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(H, generator=g, dtype=torch.float64, requires_grad=True)
    sees_first = torch.rand(B, T, 6, generator=g) < 0.7
    sees_first[..., 0] = True
    sees_second = torch.rand(B, T, 3, generator=g) < 0.6
    sees_second[:, :2] = False
    upstream = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    leaves = (q, first, second, sinks)

    parts = [attention_part(q, first, sees_first), attention_part(q, second, sees_second)]
    out, lse = merge_softmax_parts([p for p, _ in parts], [lse for _, lse in parts], sinks)
    got = torch.autograd.grad((out * upstream).sum(), leaves)

    keys = torch.cat((first, second, torch.zeros(B, 1, D, dtype=torch.float64)), dim=1)
    allowed = torch.cat((sees_first, sees_second), -1)[:, :, None]
    scores = torch.einsum("bthd,bkd->bthk", q, keys[:, :-1]).masked_fill(~allowed, -torch.inf)
    scores = torch.cat((scores, sinks.expand(B, T, H)[..., None]), -1)  # the sink: value 0
    expected_lse = scores.logsumexp(-1)
    expected = torch.einsum("bthk,bkd->bthd", scores.softmax(-1), keys)
    wanted = torch.autograd.grad((expected * upstream).sum(), leaves)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("q", "first", "second", "sinks"), got, wanted, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_the_written_out_backward_matches_numerical_differentiation():
    g = torch.Generator().manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    parts, lses, sinks = (
        [leaf(B, T, H, D), leaf(B, T, H, D)],
        [leaf(B, T, H), leaf(B, T, H)],
        leaf(H),
    )

    def merged(sinks, *tensors):
        return merge_softmax_parts(list(tensors[:2]), list(tensors[2:]), sinks)[0]

    assert torch.autograd.gradcheck(merged, (sinks, *parts, *lses))


def test_autograd_keeps_the_parts_themselves_and_no_float32_copy():
    """bf16 parts: what the merge saves is the parts (the same storage: nothing added where
    the attention kernel keeps them too), the float32 log-sum-exps and the sinks; the same
    formula in torch ops keeps a float32 copy of each part besides."""
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(B, T, H, D, generator=g).bfloat16().requires_grad_() for _ in range(2)]
    lses = [torch.randn(B, T, H, generator=g).requires_grad_() for _ in range(2)]
    sinks = torch.randn(H, generator=g).requires_grad_()
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        merge_softmax_parts(parts, lses, sinks)
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert storages == {t.untyped_storage().data_ptr() for t in [*parts, *lses, sinks]}
    assert not any(t.dtype == torch.float32 and t.dim() == 4 for t in saved)

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        lse = torch.stack([*lses, sinks.expand_as(lses[0])]).logsumexp(0)
        sum(p.float() * torch.exp(pl - lse)[..., None] for p, pl in zip(parts, lses, strict=True))
    assert sum(t.dtype == torch.float32 and t.shape == (B, T, H, D) for t in saved) == 2
