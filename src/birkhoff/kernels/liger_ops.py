"""The `triton` backend's generic ops taken from liger-kernel (a maintained library, not
written again here): the fused linear + cross-entropy, RMSNorm, SwiGLU and RoPE.

liger-kernel is imported on the first call (importing it costs ~4 s), and these ops are only
registered where it is installed (`birkhoff[cuda]`); without it they are listed reference
fallbacks. Under Triton's CPU interpreter (the tests) liger's modules are adapted first
(kernels/triton_interpreter.py); compiled Triton runs them as they are.

Each op computes what the reference computes, in the same precision:
- RMSNorm in liger's "gemma" casting mode: input and weight in float32, the output cast back
  (the reference's F.rms_norm on float32 copies). `in_place=False`: liger's default writes the
  input gradient over the output gradient, which autograd may hand to another branch as well
  (a residual add gives both of its inputs the same gradient tensor).
- SwiGLU: silu in float32 rounded to the input dtype, times `up` in it (as F.silu then `*`).
  liger's backward writes the gradients over the saved `gate` and `up`: the callers' own
  temporaries (a projection's output), which nothing else keeps. With V4's clamp
  (kernels/reference.swiglu_clamp), which liger's kernel lacks, kernels/triton_swiglu.py's.
- The fused linear cross-entropy in the reference's chunks (`chunk_mem_const` from its logits
  budget), not liger's default of ceil(vocab / hidden) chunks.
- RoPE on queries and keys in one launch (liger's kernel takes both), rotating half-pairs in
  float32 with the reference's (T, D/2) or (B, T, D/2) tables. liger rotates in place; this op
  rotates copies, so its inputs and gradients are never written.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from types import ModuleType

import torch

from birkhoff.kernels.linear_cross_entropy import chunk_tokens
from birkhoff.kernels.registry import register
from birkhoff.kernels.triton_interpreter import adapt_for_liger
from birkhoff.kernels.triton_swiglu import clamped_swiglu


@functools.cache  # looked up on every call of an op: once per process is enough
def _liger(name: str) -> ModuleType:
    return adapt_for_liger(importlib.import_module(f"liger_kernel.ops.{name}"))


@register("linear_cross_entropy", "triton")
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy (mean over tokens, float32), in chunks of at
    most `chunk` tokens (default: chunk_tokens) rounded up to a power of two (liger's sizes)."""
    function = _liger("fused_linear_cross_entropy").LigerFusedLinearCrossEntropyFunction
    budget = liger_logits_budget(hidden.shape, weight.shape[0], chunk)
    # its forward's amp wrapper drops keywords: every argument by position, in its order
    call = _forward_signature(function).bind(None, hidden, weight, targets, chunk_mem_const=budget)
    call.apply_defaults()
    return function.apply(*call.args[1:])[0].float()


@functools.cache
def _forward_signature(function: type[torch.autograd.Function]) -> inspect.Signature:
    return inspect.signature(function.forward)


def liger_logits_budget(hidden_shape: torch.Size, vocab: int, chunk: int | None) -> int:
    """liger's `chunk_mem_const` C for chunks of `chunk` tokens: liger bounds a chunk's
    logits by C x tokens x hidden elements (C rounded down, so a chunk holds at most `chunk`
    tokens before liger's power of two). Its default (1) cuts any batch into up to
    ceil(vocab / hidden) chunks (22 at `tiny`, 18 at V4's widths), three matmuls, two copies
    and a cross-entropy launch each, where the reference's logits budget makes one chunk at
    `tiny` and 8 at V4's 4,096 tokens."""
    tokens, width = hidden_shape
    logits = (chunk or chunk_tokens(vocab)) * vocab
    return max(1, logits // max(1, tokens * width))


@register("rms_norm", "triton")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """liger's RMSNorm over the last dimension, computed in float32 ("gemma" mode)."""
    function = _liger("rms_norm").LigerRMSNormFunction
    return function.apply(x, weight, eps, 0.0, "gemma", False)


@register("swiglu", "triton")
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """liger's silu(gate) * up; with V4's clamp our kernel (liger's has none: clamping in
    torch around it launched ~10 kernels more, kernels/triton_swiglu.py)."""
    if limit is not None:
        return clamped_swiglu(gate, up, limit)
    return _liger("swiglu").LigerSiLUMulFunction.apply(gate, up)  # it makes them contiguous


@register("rope", "triton")
def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """liger's rotary embedding of queries and keys (B, T, H, D) in one launch."""
    return _RotateQueriesAndKeys.apply(q, k, cos.contiguous(), sin.contiguous())


def _rotated(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    # liger takes (B, H, T, D) and turns it back to a contiguous (B, T, H, D), which it
    # rotates in place: these fresh copies. `rotary_dim` = D: the tables hold D/2 angles.
    module = _liger("rope")
    run = module.rope_backward if backward else module.rope_forward
    q, k = (t.clone(memory_format=torch.contiguous_format).transpose(1, 2) for t in (q, k))
    rotated = run(q, k, cos, sin, rotary_dim=q.shape[-1])
    return rotated[0].transpose(1, 2), rotated[1].transpose(1, 2)


class _RotateQueriesAndKeys(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotated(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotated(grad_q, grad_k, cos, sin, backward=True)
        return dq, dk, None, None
