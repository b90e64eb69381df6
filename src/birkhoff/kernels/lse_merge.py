"""Softmax attention computed in parts (keys split between calls) joined into one softmax with
a per-head sink logit, by the parts' log-sum-exps: with o_i and L_i part i's output and
log-sum-exp over its keys and s the sink, L = log(sum_i exp(L_i) + exp(s)) and the output is
sum_i o_i exp(L_i - L). The triton backend's V4 attention joins its window and entries calls
this way (kernels/flex_v4_attention.py).

As one autograd Function: it keeps the parts as they are (the attention kernels keep the same
tensors for their own backward, so nothing is added), the (B, T, H) log-sum-exps and the
sinks, and recomputes the weights in backward, where dout . out is summed from the parts' own
(sum_i w_i dout . o_i: the joined output is not made again; float32 temporaries of a part's
size there, one at a time). Written with torch ops, autograd would keep a float32 copy of
every part (4 bytes a value: 256 KiB a token at V4-Flash's 64 heads of 512 for two parts,
where the bf16 parts are 128 KiB). Backward, with w_i = exp(L_i - L) and w_s = exp(s - L):
d o_i = w_i dout, d L_i = w_i dout . (o_i - out), d s = -sum over tokens of w_s dout . out.
"""

from __future__ import annotations

import torch


def merge_softmax_parts(
    parts: list[torch.Tensor], lses: list[torch.Tensor], sinks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """parts (B, T, H, D), lses (B, T, H) float32 (-inf where a part had no key for a query),
    sinks (H,) -> the joined output (B, T, H, D) in the parts' dtype, and its log-sum-exp L
    (B, T, H) float32 (float64 for float64 inputs; no gradient)."""
    return _Merge.apply(sinks, len(parts), *parts, *lses)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 where given (the tests' oracle precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _weights(sinks, lses):
    """The joined log-sum-exp and each part's weight exp(L_i - L), in float32 or wider."""
    lse = torch.stack([*map(_wide, lses), _wide(sinks).expand_as(lses[0])]).logsumexp(0)
    return lse, [torch.exp(_wide(part_lse) - lse) for part_lse in lses]


def _joined(parts, weights):
    """sum_i o_i w_i in float32 or wider."""
    pairs = zip(parts, weights, strict=True)
    return sum(_wide(part) * weight[..., None] for part, weight in pairs)


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sinks, count, *parts_and_lses):
        parts, lses = parts_and_lses[:count], parts_and_lses[count:]
        lse, weights = _weights(sinks, lses)
        ctx.save_for_backward(sinks, *parts, *lses)
        ctx.count = count
        ctx.mark_non_differentiable(lse)
        return _joined(parts, weights).to(parts[0].dtype), lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        sinks, *saved = ctx.saved_tensors
        parts, lses = saved[: ctx.count], saved[ctx.count :]
        lse, weights = _weights(sinks, lses)
        d_out = _wide(d_out)
        # dout . out, summed from each part's dout . o_i: no joined output made again
        dots = [(d_out * _wide(part)).sum(-1) for part in parts]
        d_out_dot_out = sum(w * dot for w, dot in zip(weights, dots, strict=True))
        d_parts = [(d_out * w[..., None]).to(p.dtype) for p, w in zip(parts, weights, strict=True)]
        d_lses = [
            (w * (dot - d_out_dot_out)).to(part_lse.dtype)
            for w, dot, part_lse in zip(weights, dots, lses, strict=True)
        ]
        sink_weight = torch.exp(_wide(sinks) - lse)
        d_sinks = -(sink_weight * d_out_dot_out).flatten(0, -2).sum(0)
        return d_sinks.to(sinks.dtype), None, *d_parts, *d_lses
