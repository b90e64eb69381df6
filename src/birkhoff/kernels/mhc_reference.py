"""mHC's reference ops: Sinkhorn-Knopp (the paper's log-space form and V4's), the stream read
and merge, and the mappings' normalised projection; plain PyTorch, registered as the
`reference` backend (kernels/reference.py re-exports them).

In eager mode the stream read and merge are autograd Functions whose backward is written out
(every gradient as one batched product or one broadcast product, where autograd's own
formulas made a transposed-operand matmul, an outer product as a matmul and two
stream-sized temporaries); compiled code traces the plain expressions instead, which
inductor fuses.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from birkhoff.kernels.registry import REFERENCE, register
from birkhoff.kernels.row_functions import inverse_rms


def _batch_last(matrices: torch.Tensor) -> torch.Tensor:
    """(..., n, n) -> (n, n, batch), contiguous, in float32 at least: both Sinkhorn forms
    reduce over contiguous batch rows (see _sinkhorn_log)."""
    n, compute_dtype = matrices.shape[-1], torch.promote_types(matrices.dtype, torch.float32)
    return matrices.to(compute_dtype).reshape(-1, n, n).permute(1, 2, 0).contiguous()


def _batch_first(matrices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n, n, batch) -> `like`'s shape and dtype, contiguous: a permuted H_res sends the
    following matmul down a per-matrix slow path."""
    return matrices.permute(2, 0, 1).contiguous().view(like.shape).to(like.dtype)


def _sinkhorn_log(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """exp(logits) projected toward the doubly stochastic matrices over the last two dims.

    Each iteration normalises columns, then rows, in log space (no overflow for any logits);
    the rows are therefore exact after the last iteration and the columns approximate. A
    normalisation m - logsumexp(m) is one `log_softmax` (one fused op forward and one
    backward, where logsumexp and the subtraction were seven small kernels and their
    gradients: 2.7x faster forward and backward on 512 tokens' 4 x 4 matrices). The matrices
    are laid out (n, n, batch) so each reduction runs over contiguous batch rows: 3.7x faster
    than reducing the trailing 4-wide dimension (measured on 2048 4x4 matrices).
    """
    log_m = _batch_last(logits)
    for _ in range(iters):
        log_m = torch.log_softmax(log_m, dim=0)
        log_m = torch.log_softmax(log_m, dim=1)
    return _batch_first(log_m.exp(), logits)


def _eps_steps(logits: torch.Tensor, iters: int, eps: float):
    """V4's iterations on the (n, n, batch) layout, one normalisation at a time: yields the
    softmax p first, then (dim, m', D) for each m' = m / D with D = sum over dim of m, + eps."""
    p = torch.softmax(logits, dim=0)
    yield p
    m = p + eps
    for dim in (1, *(0, 1) * (iters - 1)):
        divisor = m.sum(dim, keepdim=True).add_(eps)
        m = m / divisor
        yield dim, m, divisor


def _sinkhorn_eps(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """DeepSeek-V4's production Sinkhorn (inference/model.py) in our orientation (we apply
    H_res x; V4's `comb` is its transpose): a softmax down each column plus `eps`, rows
    normalised, then `iters - 1` times columns and rows, each sum taken as (sum + eps). In
    linear space: the softmax bounds every entry. Row sums end at s / (s + eps), not exactly 1.
    Laid out (n, n, batch) as `sinkhorn_knopp` is, for the same reason."""
    steps = _eps_steps(_batch_last(logits), iters, eps)
    m = next(steps)  # the softmax; there is always a step after it
    for step in steps:  # only the latest kept
        m = step[1]
    return _batch_first(m, logits)


class _SinkhornEps(torch.autograd.Function):
    """V4's Sinkhorn keeping only its logits; backward runs the iterations again and walks
    them back with the gradient written out: for m' = m / D, D = sum m + eps,
    dm = (dm' - sum dm' m') / D; for p = softmax(x), dx = p (dp - sum dp p). Four ops per
    normalisation, where autograd through the recomputed iterations ran about ten and
    recorded a node for each (at `tiny` this Sinkhorn was ~10% of a step)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        ctx.iters, ctx.eps = iters, eps
        ctx.save_for_backward(logits)
        return _sinkhorn_eps(logits, iters, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        p, *steps = _eps_steps(_batch_last(logits), ctx.iters, ctx.eps)
        d_m = _batch_last(grad)
        for dim, normalised, divisor in reversed(steps):
            d_m = (d_m - (d_m * normalised).sum(dim, keepdim=True)).div_(divisor)
        d_logits = p * (d_m - (d_m * p).sum(0, keepdim=True))
        return _batch_first(d_logits, logits), None, None


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _RecomputedInBackward(torch.autograd.Function):
    """`fn(logits, *args)` with autograd keeping only `logits`: forward runs the iterations
    unrecorded, backward runs them again recorded and differentiates that (the mHC paper's
    recomputation, §4.3). Unrolled, autograd would keep every iteration's matrices and sums:
    2 x iters x (n^2 + n) floats per token and join, 2.7 KB of a join's 5.7 in the V4 tiny."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, fn, *args) -> torch.Tensor:
        ctx.fn, ctx.args = fn, args
        ctx.save_for_backward(logits)
        return fn(logits, *args)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        # The recomputed graph lives only inside this backward: no outer saved-tensor hook
        # (offloading, counting) is handed its tensors.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
            again = logits.detach().requires_grad_()
            (logits_grad,) = torch.autograd.grad(ctx.fn(again, *ctx.args), again, grad)
        return (logits_grad, None, *(None for _ in ctx.args))


def _recomputed_in_backward(logits: torch.Tensor, fn, *args) -> torch.Tensor:
    """Compiled code runs `fn` as it is: AOTAutograd's partitioner then chooses what backward
    recomputes (cheap elementwise chains like these iterations are what it recomputes), where
    eager autograd would keep every iteration."""
    if torch.compiler.is_compiling():
        return fn(logits, *args)
    return _RecomputedInBackward.apply(logits, fn, *args)


@register("sinkhorn_knopp", REFERENCE)
def sinkhorn_knopp(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """exp(logits) projected toward the doubly stochastic matrices over the last two dims:
    each iteration normalises columns, then rows, in log space (no overflow for any logits);
    the rows are therefore exact after the last iteration and the columns approximate.
    Backward recomputes the iterations instead of keeping them."""
    return _recomputed_in_backward(logits, _sinkhorn_log, iters)


@register("sinkhorn_knopp_eps", REFERENCE)
def sinkhorn_knopp_eps(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """DeepSeek-V4's production Sinkhorn (see _sinkhorn_eps); backward recomputes the
    iterations instead of keeping them."""
    if torch.compiler.is_compiling():  # see _recomputed_in_backward
        return _sinkhorn_eps(logits, iters, eps)
    return _SinkhornEps.apply(logits, iters, eps)


def _matmul_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of `tensor` runs in: autocast's where it is on (it leaves float64
    alone), else the tensor's own."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device) and tensor.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return tensor.dtype


class _StreamRead(torch.autograd.Function):
    """sum_i h[i] x_i per token: x (M, n, C), h (M, n) -> (M, C)."""

    @staticmethod
    def forward(ctx, streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(streams, h_pre)
        return torch.bmm(h_pre.unsqueeze(1), streams).squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        streams, h_pre = ctx.saved_tensors
        d_streams = d_h = None
        if ctx.needs_input_grad[0]:  # an outer product: a broadcast product, not a matmul
            d_streams = h_pre.unsqueeze(-1) * grad.unsqueeze(-2)
        if ctx.needs_input_grad[1]:  # a row times x^T: 8x faster here than x times a column
            d_h = torch.bmm(grad.unsqueeze(1), streams.transpose(1, 2)).squeeze(1)
        return d_streams, d_h


class _StreamMerge(torch.autograd.Function):
    """H_res x + h_post^T y per token: x (M, n, C), y (M, C), H_res (M, n, n), h_post (M, n)."""

    @staticmethod
    def forward(ctx, streams, layer_out, h_res, h_post) -> torch.Tensor:
        ctx.save_for_backward(streams, layer_out, h_res, h_post)
        update = h_post.unsqueeze(-1) * layer_out.unsqueeze(-2)
        return update.baddbmm_(h_res, streams)  # the mix added in place: no third temporary

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        streams, layer_out, h_res, h_post = ctx.saved_tensors
        need = ctx.needs_input_grad
        # Vector-matrix products as a row times a matrix: as a matrix times a column, bmm
        # takes 8-10x longer here (1.3 ms against 0.14 for 512 tokens x 4 x 768).
        # H_res^T made contiguous first (n x n per token): as a transposed batch operand bmm
        # took 1.4x as long (512 tokens x 4 x 768)
        d_streams = torch.bmm(h_res.transpose(1, 2).contiguous(), grad) if need[0] else None
        d_out = torch.bmm(h_post.unsqueeze(1), grad).squeeze(1) if need[1] else None
        d_res = torch.bmm(grad, streams.transpose(1, 2)) if need[2] else None
        d_post = None
        if need[3]:
            d_post = torch.bmm(layer_out.unsqueeze(1), grad.transpose(1, 2)).squeeze(1)
        return d_streams, d_out, d_res, d_post


@register("mhc_pre", REFERENCE)
def mhc_pre(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Layer input from n streams: sum_i h_pre[i] * x_i. (B, T, n, C), (B, T, n) -> (B, T, C),
    computed in the dtype a matmul of the streams runs in (autocast's under autocast)."""
    if torch.compiler.is_compiling():
        return (h_pre.to(streams.dtype).unsqueeze(-2) @ streams).squeeze(-2)
    dtype, (*batch, n, c) = _matmul_dtype(streams), streams.shape
    with torch.autocast(streams.device.type, enabled=False):
        rows = streams.to(dtype).reshape(-1, n, c)
        out = _StreamRead.apply(rows, h_pre.to(dtype).reshape(-1, n))
    return out.view(*batch, c)


@register("mhc_post", REFERENCE)
def mhc_post(
    streams: torch.Tensor, layer_out: torch.Tensor, h_res: torch.Tensor, h_post: torch.Tensor
) -> torch.Tensor:
    """Next streams H_res x + h_post^T F(x): (B,T,n,C), (B,T,C), (B,T,n,n), (B,T,n) -> (B,T,n,C)."""
    # The residual streams keep their dtype (fp32) under autocast: a bf16 H_res x would round
    # the whole residual at every sublayer, which the plain residual x + F(x) never does.
    dtype, (*batch, n, c) = streams.dtype, streams.shape
    with torch.autocast(streams.device.type, enabled=False):
        h_res, h_post, layer_out = h_res.to(dtype), h_post.to(dtype), layer_out.to(dtype)
        if torch.compiler.is_compiling():
            return h_res @ streams + h_post.unsqueeze(-1) * layer_out.unsqueeze(-2)
        merged = _StreamMerge.apply(
            streams.reshape(-1, n, c),
            layer_out.reshape(-1, c),
            h_res.reshape(-1, n, n),
            h_post.reshape(-1, n),
        )
    return merged.view(*batch, n, c)


# RMSNorm(v) phi without the normalised v: RMSNorm has no weight in mHC's mappings, so it equals
# (v phi) / rms(v), one matmul and one norm over v (the mHC paper's kernels reorder it the same
# way, section 4.3), and its backward is one matmul plus one scaled copy of v. As F.rms_norm then
# a linear layer, a `small` training step took 2.62 s against 2.26 s reordered (same process,
# alternating; 2-core CPU): the normalised n C vector and its gradient chain are several passes
# over the widest tensor of the block.
class _NormalisedProjection(torch.autograd.Function):
    """(v W^T) r with r = (mean(v^2) + eps)^(-1/2) per row of v (N, D); W (K, D)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        scale = inverse_rms(flat, eps)
        projected = flat @ weight.T
        ctx.save_for_backward(flat, weight, projected, scale)
        return projected * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        flat, weight, projected, scale = ctx.saved_tensors
        # float32 like the forward, even where backward runs inside an autocast region
        with torch.autocast(grad.device.type, enabled=False):
            grad_projected = grad * scale
            d_flat = d_weight = None
            if ctx.needs_input_grad[0]:  # through v W^T, and through r: dr/dv = -r^3 v / D
                through_scale = (grad * projected).sum(-1, keepdim=True) * scale.pow(3)
                # the GEMM adds into the scaled copy of v in place: addmm would copy it once
                # more (1.7x the time at 512 tokens x 3072)
                d_flat = flat * (-through_scale / flat.shape[-1])
                d_flat.addmm_(grad_projected, weight)
            if ctx.needs_input_grad[1]:
                d_weight = grad_projected.T @ flat
        return d_flat, d_weight, None


def normalised_projection(streams: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(vec(x)) W^T over the n C values of each token's streams x (..., n, C), in float32
    whatever the inputs and autocast: (..., K) for W (K, n C)."""
    with torch.autocast(streams.device.type, enabled=False):
        flat, weight = streams.flatten(-2).float(), weight.float()
        if torch.compiler.is_compiling():  # the same order, for inductor to fuse
            return (flat @ weight.T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
        rows = flat.reshape(-1, flat.shape[-1])
        projected = _NormalisedProjection.apply(rows, weight, eps)
        return projected.view(*flat.shape[:-1], weight.shape[0])


@register("mhc_mapping", REFERENCE)
def mhc_mapping(
    streams: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    bias_pre: torch.Tensor,
    bias_post: torch.Tensor,
    bias_res: torch.Tensor,
    norm_eps: float,
    iters: int,
    form_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC's three mappings of the n streams (B, T, n, C): x' = RMSNorm(vec(x)) (eps
    `norm_eps`), its projection x' phi (weight (2n + n^2, n C)) in float32 even under autocast
    (H_res feeds Sinkhorn, whose logits need the precision), then with alpha (3,) and biases
    (pre (n,), post (n,), res (n, n)):
        H_pre = sigmoid(a_pre x'phi_pre + b_pre)        (+ form_eps: V4's form)
        H_post = 2 sigmoid(a_post x'phi_post + b_post)
        H_res = Sinkhorn(a_res mat(x'phi_res) + b_res)  (V4's form: sinkhorn_knopp_eps).
    Returns (H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n)), float32."""
    n = streams.shape[-2]
    projected = normalised_projection(streams, weight, norm_eps)
    pre, post, res = projected.split([n, n, n * n], dim=-1)
    a_pre, a_post, a_res = alpha
    h_pre = torch.sigmoid(a_pre * pre + bias_pre)
    logits = a_res * res.unflatten(-1, (n, n)) + bias_res
    if form_eps is None:
        h_res = sinkhorn_knopp(logits, iters)
    else:
        h_pre, h_res = h_pre + form_eps, sinkhorn_knopp_eps(logits, iters, form_eps)
    return h_pre, 2 * torch.sigmoid(a_post * post + bias_post), h_res


def composed_read(mapping, pre):
    """The `mhc_read` op of a backend with its own `mhc_mapping` and `mhc_pre`: the one then
    the other (a backend that fuses them, `cpu`, registers its own)."""

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
        """mHC's read of the streams for a sublayer: (H_pre x (B, T, C), H_post, H_res) with
        the mappings of `mhc_mapping` (same arguments) and H_pre x as `mhc_pre`'s, then the
        streams the merge (`mhc_post`) is to take: here the streams themselves; a backend may
        pass them through its read so that its backward adds the merge's gradient of them."""
        h_pre, h_post, h_res = mapping(
            streams, weight, alpha, bias_pre, bias_post, bias_res, norm_eps, iters, form_eps
        )
        return pre(streams, h_pre), h_post, h_res, streams

    return mhc_read


mhc_read = register("mhc_read", REFERENCE)(composed_read(mhc_mapping, mhc_pre))


def composed_merge_read(post, read):
    """The `mhc_merge_read` op of a backend with its own `mhc_post` and `mhc_read`: the one then
    the other (a backend that fuses them, `cpu`, registers its own)."""

    def mhc_merge_read(
        streams: torch.Tensor,
        layer_out: torch.Tensor,
        h_res: torch.Tensor,
        h_post: torch.Tensor,
        weight: torch.Tensor,
        alpha: torch.Tensor,
        bias_pre: torch.Tensor,
        bias_post: torch.Tensor,
        bias_res: torch.Tensor,
        norm_eps: float,
        iters: int,
        form_eps: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sublayer's merge and the next one's read: `mhc_post` of (streams, layer_out,
        h_res, h_post), then `mhc_read` of the merged streams with the next hyper-connection's
        arguments (weight on); returns what `mhc_read` does, the merged streams last."""
        merged = post(streams, layer_out, h_res, h_post)
        return read(merged, weight, alpha, bias_pre, bias_post, bias_res, norm_eps, iters, form_eps)

    return mhc_merge_read


mhc_merge_read = register("mhc_merge_read", REFERENCE)(composed_merge_read(mhc_post, mhc_read))
