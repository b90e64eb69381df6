"""mHC on the `npu` backend through torch_npu's own mHC operators (CANN 9): `npu_mhc_pre` (the
streams' RMS over n C values, the projection to 2n + n^2 values in float32, the scales, biases
and sigmoids, and H_pre x: one operator), `npu_mhc_sinkhorn` (V4's Sinkhorn), `npu_mhc_post`
(the merge) and their backward operators, which recompute nothing they were handed: the
forward's RMS, projection, H_pre, H_post and Sinkhorn iterates go back to them.

Their semantics are the vendor tests' golden formulas (op-plugin's tests of npu_mhc_pre and
npu_mhc_sinkhorn; npu_mhc_post's docs give its formula), which are DeepSeek-V4's and this
project's V4 form (kernels/mhc_reference.py) but for orientation: the operators mix the
streams with V4's `comb`, our H_res transposed. So the Sinkhorn takes our logits transposed and
hands back comb, whose transposed view is our H_res, and the merge takes that view's
transpose, comb itself: no copy either way.

Limits (the reference runs otherwise, and the kernel table says so): streams in bfloat16 or
float16 (the operators take no float32 streams: under autocast the residual streams stay
float32, under FSDP's bfloat16 parameters they are bfloat16); V4's form (the paper's Sinkhorn
has no eps); 4, 6 or 8 streams; for the Sinkhorn at most 65,536 tokens a call (op-plugin's
docs of npu_mhc_sinkhorn, training with out_flag=1; the wheel's docstring gives no bound);
and a CANN that has the operators (Ascend 950; a 910B or 910C's has none): probed once per
process with one 4 x 4 Sinkhorn.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from birkhoff.kernels import mhc_reference
from birkhoff.kernels.mhc_reference import composed_merge_read
from birkhoff.kernels.npu_ops import NPU, _torch_npu
from birkhoff.kernels.registry import register

STREAM_DTYPES = (torch.bfloat16, torch.float16)
STREAMS = (4, 6, 8)  # the operators' n
MOST_TOKENS = 65_536  # the Sinkhorn's, training (out_flag=1)
# the calls the operators take, for the table (other calls run the reference)
POST_LIMITS = "4, 6 or 8 streams"
READ_LIMITS = "V4's form, 4, 6 or 8 streams, <= 65,536 tokens"
SINKHORN_LIMITS = "4 x 4, 6 x 6 or 8 x 8, <= 65,536 matrices, 1 to 100 iterations"


@functools.cache
def _probe(module: ModuleType) -> str | None:
    """None where torch_npu's mHC operators run, else why not (its error's first line);
    cached per torch_npu `module` (the one imported)."""
    device = "npu" if hasattr(torch, "npu") else "cpu"  # a stand-in torch_npu registers none
    try:
        _torch_npu().npu_mhc_sinkhorn(torch.ones(1, 4, 4, device=device), eps=1e-6, num_iters=1)
        if device == "npu":  # an error of the kernel itself surfaces here
            torch.npu.synchronize()
    except Exception as err:  # whatever CANN raises; the table shows it
        first = (str(err).splitlines() or [type(err).__name__])[0]
        return f"torch_npu's mHC operators do not run ({first})"
    return None


def mhc_operators_missing() -> str | None:
    """What this machine lacks for torch_npu's mHC operators, or None."""
    try:
        module = _torch_npu()
    except Exception as err:  # ImportError, or CANN's own failure at import
        return f"torch_npu does not import ({err})"
    return _probe(module)


def _takes(matrices: torch.Tensor, iters: int | None = None) -> bool:
    """Whether the operators take a call on `matrices` (..., n, C or n) (the dtype is the
    registry's): n of theirs, a token at least; with a Sinkhorn of `iters` iterations, 1 to
    100 of them and at most MOST_TOKENS tokens."""
    tokens = matrices[..., 0, 0].numel()
    if matrices.shape[-2] not in STREAMS or tokens == 0:
        return False
    return iters is None or (tokens <= MOST_TOKENS and 1 <= iters <= 100)


def _sinkhorn(logits: torch.Tensor, eps: float, iters: int) -> tuple[torch.Tensor, ...]:
    """npu_mhc_sinkhorn on our logits (..., n, n): H_res (a view of the operator's comb, its
    transpose) and the iterates and sums its backward takes."""
    comb, iterates, sums = _torch_npu().npu_mhc_sinkhorn(
        logits.transpose(-1, -2).contiguous(), eps=eps, num_iters=iters, out_flag=1
    )
    return comb.transpose(-1, -2), iterates, sums


def _sinkhorn_backward(
    d_res: torch.Tensor, iterates: torch.Tensor, sums: torch.Tensor
) -> torch.Tensor:
    """The gradient of our logits from H_res's, through V4's orientation and back."""
    d_comb = d_res.transpose(-1, -2).float().contiguous()
    return _torch_npu().npu_mhc_sinkhorn_backward(d_comb, iterates, sums).transpose(-1, -2)


def _biases(bias_pre, bias_post, bias_res) -> torch.Tensor:
    return torch.cat((bias_pre.float(), bias_post.float(), bias_res.float().flatten()))


class _Read(torch.autograd.Function):
    """mhc_read: (H_pre x, H_post, H_res, x); the streams handed back through it, so that its
    backward adds the merge's gradient of them in npu_mhc_pre_backward (grad_x_post)."""

    @staticmethod
    def forward(ctx, streams, weight, alpha, bias_pre, bias_post, bias_res, norm_eps: float,
                iters: int, form_eps: float):  # fmt: skip
        phi, scales = weight.float(), alpha.float()
        layer_in, h_post, logits, inv_rms, mix, h_pre = _torch_npu().npu_mhc_pre(
            streams, phi, scales, _biases(bias_pre, bias_post, bias_res),
            norm_eps=norm_eps, hc_eps=form_eps, out_flag=1,
        )  # fmt: skip
        h_res, iterates, sums = _sinkhorn(logits, form_eps, iters)
        ctx.save_for_backward(streams, phi, scales, inv_rms, mix, h_pre, h_post, iterates, sums)
        ctx.form_eps = form_eps
        ctx.dtypes = [t.dtype for t in (weight, alpha, bias_pre, bias_post, bias_res)]
        return layer_in, h_post, h_res, streams  # the streams: autograd's view

    @staticmethod
    @once_differentiable
    def backward(ctx, d_layer_in, d_post, d_res, d_streams):
        streams, phi, scales, inv_rms, mix, h_pre, h_post, iterates, sums = ctx.saved_tensors
        n = streams.shape[-2]
        d_logits = _sinkhorn_backward(d_res, iterates, sums).contiguous()
        d_x, d_phi, d_alpha, d_bias, _ = _torch_npu().npu_mhc_pre_backward(
            streams, phi, scales, d_layer_in.to(streams.dtype), d_post.float(), d_logits,
            inv_rms, mix, h_pre, h_post, hc_eps=ctx.form_eps,
            grad_x_post=d_streams.to(streams.dtype),
        )  # fmt: skip
        d_pre, d_post_bias, d_res_bias = d_bias.split([n, n, n * n])
        grads = (d_phi, d_alpha, d_pre, d_post_bias, d_res_bias.view(n, n))
        cast = [g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)]
        return d_x, *cast, None, None, None


class _Merge(torch.autograd.Function):
    """mhc_post: H_res x + H_post^T F(x) as npu_mhc_post, which takes comb = H_res^T."""

    @staticmethod
    def forward(ctx, streams, layer_out, h_res, h_post):
        ctx.dtypes = (layer_out.dtype, h_res.dtype, h_post.dtype)
        # comb itself where H_res is our read's (a view of it): no copy
        comb, post = h_res.transpose(-1, -2).float().contiguous(), h_post.float()
        layer_out = layer_out.to(streams.dtype)
        ctx.save_for_backward(streams, layer_out, comb, post)
        return _torch_npu().npu_mhc_post(streams, comb, layer_out, post)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        streams, layer_out, comb, post = ctx.saved_tensors
        d_x, d_comb, d_out, d_post = _torch_npu().npu_mhc_post_backward(
            grad.to(streams.dtype).contiguous(), streams, comb, layer_out, post
        )
        out_dtype, res_dtype, post_dtype = ctx.dtypes
        d_res = d_comb.transpose(-1, -2).to(res_dtype)
        return d_x, d_out.to(out_dtype), d_res, d_post.to(post_dtype)


class _Sinkhorn(torch.autograd.Function):
    """sinkhorn_knopp_eps as npu_mhc_sinkhorn on the transposed logits (float32)."""

    @staticmethod
    def forward(ctx, logits, iters: int, eps: float):
        h_res, iterates, sums = _sinkhorn(logits, eps, iters)
        ctx.save_for_backward(iterates, sums)
        return h_res

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        iterates, sums = ctx.saved_tensors
        return _sinkhorn_backward(grad, iterates, sums), None, None


@register("mhc_read", NPU, STREAM_DTYPES, mhc_operators_missing, READ_LIMITS, on_residual=True)
def mhc_read(streams, weight, alpha, bias_pre, bias_post, bias_res, norm_eps: float, iters: int,
             form_eps: float | None = None):  # fmt: skip
    """The reference's `mhc_read` (same arguments and results) as npu_mhc_pre and
    npu_mhc_sinkhorn, where the operators take the call (module docstring)."""
    arguments = (weight, alpha, bias_pre, bias_post, bias_res, norm_eps, iters, form_eps)
    if form_eps is None or not _takes(streams, iters):  # the paper's form: no eps
        return mhc_reference.mhc_read(streams, *arguments)
    return _Read.apply(streams, *arguments)


@register("mhc_post", NPU, STREAM_DTYPES, mhc_operators_missing, POST_LIMITS, on_residual=True)
def mhc_post(streams, layer_out, h_res, h_post):
    """The reference's `mhc_post` as npu_mhc_post, where the operator takes the streams."""
    if not _takes(streams):
        return mhc_reference.mhc_post(streams, layer_out, h_res, h_post)
    return _Merge.apply(streams, layer_out, h_res, h_post)


# the merge then the read; the read's backward adds the two gradients of the merged streams
register(
    "mhc_merge_read", NPU, STREAM_DTYPES, mhc_operators_missing, READ_LIMITS, on_residual=True
)(composed_merge_read(mhc_post, mhc_read))


@register("sinkhorn_knopp_eps", NPU, (torch.float32,), mhc_operators_missing, SINKHORN_LIMITS)
def sinkhorn_knopp_eps(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The reference's V4 Sinkhorn as npu_mhc_sinkhorn (its orientation transposed)."""
    if not _takes(logits, iters):
        return mhc_reference.sinkhorn_knopp_eps(logits, iters, eps)
    flat = logits.reshape(-1, *logits.shape[-2:])
    return _Sinkhorn.apply(flat, iters, eps).reshape(logits.shape)
