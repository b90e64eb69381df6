"""mHC's read as one autograd node (the `triton` backend's `mhc_read` and `mhc_merge_read`):
the mappings' kernel, Sinkhorn's and the stream read's forward (kernels/triton_mhc_mapping.py,
triton_sinkhorn.py, triton_mhc.py), and the streams handed back for the merge through the
same node. The streams feed three ops, the mappings, the read and the merge: as separate
nodes autograd summed their three gradients with two adds of the streams' size; here the
read's backward kernel adds the merge's gradient and the mappings' backward kernel adds the
read's, in the passes that write them (as the cpu backend's read does in its C pass). The
tests compare with the reference under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from birkhoff.kernels.mhc_reference import composed_merge_read, composed_read
from birkhoff.kernels.registry import register
from birkhoff.kernels.triton_mhc import mhc_post, mhc_pre, pre_backward, pre_forward
from birkhoff.kernels.triton_mhc_mapping import mhc_mapping, project_backward, project_forward
from birkhoff.kernels.triton_sinkhorn import sinkhorn_backward, sinkhorn_forward

_composed_read = composed_read(mhc_mapping, mhc_pre)


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, streams, weight, alpha, bias_pre, bias_post, bias_res, norm_eps: float,
                iters: int, form_eps: float | None):  # fmt: skip
        streams = streams.contiguous()
        *batch, n, width = streams.shape
        flat = streams.view(-1, n * width)
        weight, alpha = weight.contiguous(), alpha.contiguous()
        biases = [b.contiguous() for b in (bias_pre, bias_post, bias_res)]
        pre_eps = 0.0 if form_eps is None else form_eps
        h_pre, h_post, logits, *kept = project_forward(
            flat, weight, alpha, biases, n, norm_eps, pre_eps
        )
        logits = logits.view(*batch, n, n)
        h_res = sinkhorn_forward(logits, iters, form_eps)
        h_pre, h_post = h_pre.view(*batch, n), h_post.view(*batch, n)
        layer_in = pre_forward(streams, h_pre)
        ctx.save_for_backward(flat, weight, alpha, *biases, *kept, logits, h_pre)
        ctx.iters, ctx.form_eps, ctx.n = iters, form_eps, n
        ctx.set_materialize_grads(False)  # an output nothing read gives no zeros
        return layer_in, h_post, h_res, streams  # the streams as they are: autograd's view

    @staticmethod
    def backward(ctx, d_layer_in, d_post, d_res, d_streams):
        *projection, logits, h_pre = ctx.saved_tensors
        d_streams = None if d_streams is None else d_streams.contiguous()
        flat = projection[0]
        streams = flat.view(*h_pre.shape, -1)
        zeros = torch.zeros_like  # for an output no gradient reached (none in a model)
        d_logits = zeros(logits) if d_res is None else sinkhorn_backward(
            logits, d_res, ctx.iters, ctx.form_eps
        )  # fmt: skip
        if d_layer_in is None:
            d_read, d_pre = d_streams, zeros(h_pre)
        else:
            d_read, d_pre = pre_backward(streams, h_pre, d_layer_in, d_streams)
        d_post = zeros(h_pre) if d_post is None else d_post
        n = ctx.n
        add = None if d_read is None else d_read.reshape(flat.shape)
        grads = project_backward(
            projection, n, d_pre.reshape(-1, n), d_post.reshape(-1, n),
            d_logits.reshape(-1, n * n), add,
        )  # fmt: skip
        return grads[0].view(streams.shape), *grads[1:], None, None, None


@register("mhc_read", "triton")
def mhc_read(
    streams: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    bias_pre: torch.Tensor,
    bias_post: torch.Tensor,
    bias_res: torch.Tensor,
    norm_eps: float,
    iters: int,
    form_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's `mhc_read` (its `mhc_mapping`, then `mhc_pre`) as one node: H_pre x in
    the streams' dtype (under autocast in its dtype, as `mhc_pre`), H_post and H_res in
    float32, and the streams for the merge through this node. Compiled code runs the three
    ops as they are (their kernels, traced one by one)."""
    args = (streams, weight, alpha, bias_pre, bias_post, bias_res, norm_eps, iters, form_eps)
    if torch.compiler.is_compiling():
        return _composed_read(*args)
    layer_in, h_post, h_res, passed = _Read.apply(*args)
    device = streams.device.type
    if torch.is_autocast_enabled(device):
        layer_in = layer_in.to(torch.get_autocast_dtype(device))
    return layer_in, h_post, h_res, passed


# a merge and the next read: triton_mhc's merge, then this read
register("mhc_merge_read", "triton")(composed_merge_read(mhc_post, mhc_read))
