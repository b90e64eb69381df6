"""V4's clamped SwiGLU, silu(min(gate, L)) * clamp(up, -L, L), as one Triton kernel per
direction (the `triton` backend's `swiglu` where a limit is set; without one it is
liger-kernel's, kernels/liger_ops.py, whose kernel has no clamp). Clamping in torch before
liger's kernel launched two clamps forward and their masks backward (a comparison, a
`where` and a scalar each, about 8 launches) around liger's one each way.

Computed in float32 and rounded once into the output's dtype (gate's and up's promoted), as
the cpu backend's kernel (the reference rounds silu to the gate's dtype first); the backward
too, each gradient rounded once; the clamp passes a gradient where torch's clamp does (gate
<= L; -L <= up <= L). The tests compare with the formula and its derivatives written out in
float64 under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from birkhoff.kernels import reference

BLOCK = 1024


@triton.jit
def _clamped(gate_ptr, up_ptr, at, on, limit):
    """The gate and up at `at`, in float32, clamped; and where each passes a gradient."""
    g = tl.load(gate_ptr + at, mask=on, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + at, mask=on, other=0.0).to(tl.float32)
    pass_g = g <= limit
    pass_u = (u >= -limit) & (u <= limit)
    g = tl.where(g > limit, limit, g)  # `where`, not minimum: a NaN stays NaN as in torch
    u = tl.where(u > limit, limit, tl.where(u < -limit, -limit, u))
    return g, u, pass_g, pass_u


@triton.jit
def _forward(gate_ptr, up_ptr, out_ptr, total, limit, BLOCK: tl.constexpr):
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: numel > 2^31
    on = at < total
    g, u, _, _ = _clamped(gate_ptr, up_ptr, at, on, limit)
    tl.store(out_ptr + at, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=on)


@triton.jit
def _backward(grad_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, total, limit, BLOCK: tl.constexpr):
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    on = at < total
    g, u, pass_g, pass_u = _clamped(gate_ptr, up_ptr, at, on, limit)
    d = tl.load(grad_ptr + at, mask=on, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    d_g = tl.where(pass_g, d * u * s * (1.0 + g * (1.0 - s)), 0.0)
    d_u = tl.where(pass_u, d * g * s, 0.0)
    tl.store(d_gate_ptr + at, d_g.to(d_gate_ptr.dtype.element_ty), mask=on)
    tl.store(d_up_ptr + at, d_u.to(d_up_ptr.dtype.element_ty), mask=on)


class _ClampedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, limit: float) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype),
                          device=gate.device)  # fmt: skip
        if out.numel():
            _forward[(triton.cdiv(out.numel(), BLOCK),)](
                gate, up, out, out.numel(), float(limit), BLOCK=BLOCK
            )
        ctx.save_for_backward(gate, up)  # the unclamped inputs: the masks come from them
        ctx.limit = limit
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        if gate.numel():
            _backward[(triton.cdiv(gate.numel(), BLOCK),)](
                grad.contiguous(), gate, up, d_gate, d_up, gate.numel(), float(ctx.limit),
                BLOCK=BLOCK,
            )  # fmt: skip
        return d_gate, d_up, None


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit) in one launch each way (gate and up
    of one shape)."""
    if torch.compiler.is_compiling():  # inductor fuses the reference's expression
        return reference.swiglu(gate, up, limit)
    if gate.shape != up.shape:
        raise ValueError(
            f"swiglu takes a gate and up of one shape, got {gate.shape} and {up.shape}"
        )
    return _ClampedSwiGLU.apply(gate, up, limit)
