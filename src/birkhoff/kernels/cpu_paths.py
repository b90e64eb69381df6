"""Where the cpu backend's eager code calls its ops (kernels/cpu_library.py's
`autograd_paths`): each module's attribute holding what its ops call (the eager Function's
apply, or while torch.compile traces the custom op) and the custom op registered from the
same body. tests/test_cpu_eager_path.py replays a step's calls through the
custom ops; benchmarks/cpu_eager_path.py times a step through either. (mhc_read hands its
streams on through its own Function, `cpu_mhc_read._ReadPassingStreams`, not listed here; the
cross-entropy's row op has no autograd of its own: it runs inside linear_cross_entropy's
forward; tests/test_cpu_cross_entropy.py checks its custom op with opcheck.)"""

from __future__ import annotations

from birkhoff.kernels import (
    cpu_engram,
    cpu_gather,
    cpu_kv_compress,
    cpu_mhc,
    cpu_mhc_merge_read,
    cpu_moe,
    cpu_rows,
    cpu_v4_attention,
)

EAGER_PATHS = [  # module, its attribute calling the eager Function, the custom op
    (cpu_rows, "_rms_norm", cpu_rows.rms_norm_op),
    (cpu_rows, "_swiglu", cpu_rows.swiglu_op),
    (cpu_rows, "_rope_trailing", cpu_rows.rope_trailing_op),
    (cpu_rows, "_rope_normed", cpu_rows.rope_normed_op),
    (cpu_mhc, "_stream_read", cpu_mhc.stream_read),
    (cpu_mhc, "_stream_merge", cpu_mhc.stream_merge),
    (cpu_mhc, "_sinkhorn_op", cpu_mhc.sinkhorn),
    (cpu_mhc, "_mhc_tail", cpu_mhc.mhc_tail),
    (cpu_mhc_merge_read, "_merge_read", cpu_mhc_merge_read.merge_read_op),
    (cpu_engram, "_engram_merge", cpu_engram.engram_merge_op),
    (cpu_engram, "gather_rows", cpu_gather.gather_op),
    (cpu_kv_compress, "_kv_compress", cpu_kv_compress.kv_compress_op),
    (cpu_v4_attention, "_v4_attention", cpu_v4_attention.v4_attention_op),
    (cpu_moe, "_permute", cpu_moe.permute_op),
    (cpu_moe, "_unpermute", cpu_moe.unpermute_op),
]
