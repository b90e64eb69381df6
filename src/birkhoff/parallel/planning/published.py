"""A published training run to hold the model against: DeepSeek-V3 (arXiv 2412.19437).

Its shapes (§4.2): 61 layers of hidden size 7168, the first 3 dense (FFN 18432), then 256
routed experts (FFN 2048, top 8 of 8 groups, at most 4 groups) and 1 shared expert, vocabulary
129280, one MTP depth; 671B parameters, 37B active. Its attention (MLA: 128 heads, query
latent 1536, KV latent 512, 128 + 64 query-key and 128 value channels) is not in birkhoff; it
is stood in for by V4 attention over a full 4096-token window with the query latent, heads
and an output projection of about MLA's parameter count (176M against MLA's 187M per layer:
under 0.2% of the model). Its layout (§3.2, §3.4): 2048 H800 GPUs, PP16 (DualPipe), EP64
across 8 nodes, ZeRO-1 data parallelism over the remaining 128 ranks, 4096-token sequences in
batches of 15360 (the batch size reached after its ramp-up). Its cost (Table 1): 180K H800 GPU
hours per trillion tokens.

The plan runs it as birkhoff would (FSDP instead of ZeRO-1: parameters and gradients sharded
too, so its memory is a lower bound for V3's own layout) and leaves out what birkhoff does
not do: DualPipe's overlap of all-to-all with compute, and FP8 matmuls (V3's GEMMs ran in FP8
at twice the bf16 rate).
"""

from __future__ import annotations

from birkhoff.model.config import AttentionConfig, ModelConfig, MoEConfig, MTPConfig, ResidualConfig
from birkhoff.parallel.planning.cluster import PRESETS, Cluster
from birkhoff.parallel.planning.layout import Layout, Workload

V3_GPU_HOURS_PER_TRILLION_TOKENS = 180_000
SEQ_LEN = 4096


def deepseek_v3_model() -> ModelConfig:
    return ModelConfig(
        vocab_size=129280,
        hidden_size=7168,
        num_layers=61,
        num_heads=128,
        num_kv_heads=1,
        ffn_hidden_size=18432,
        max_seq_len=SEQ_LEN,
        residual=ResidualConfig(mode="plain"),
        attention=AttentionConfig(
            kind="v4",
            head_dim=192,
            rope_head_dim=64,
            q_lora_rank=1536,
            o_groups=8,
            o_lora_rank=1536,
            sliding_window=SEQ_LEN,
            layer_types=["sliding"] * 61,
            index_head_dim=64,  # unused: no CSA layer
        ),
        moe=MoEConfig(
            num_experts=256,
            num_shared_experts=1,
            top_k=8,
            expert_ffn_hidden_size=2048,
            num_groups=8,
            topk_groups=4,
            first_k_dense=3,
            route_scale=2.5,
        ),
        mtp=MTPConfig(depth=1),
    )


def deepseek_v3_run() -> tuple[Layout, Workload, Cluster]:
    layout = Layout(
        pp=16,
        dp_shard=128,
        ep=64,
        micro_batch=1,
        activation_checkpoint="selective",
    )
    cluster = Cluster(name="h800", devices=2048, node_size=8, **PRESETS["h800"])
    # FlashAttention-style: V3's attention kernels keep no score matrix. Its elementwise
    # traffic at the reference kernels' factor: triton's was counted on mHC models, and most of
    # what it saves is mHC's (V3's residual is plain)
    work = Workload(global_batch=15360, seq_len=SEQ_LEN, attention="fused", kernels="reference")
    return layout, work, cluster


def derived_mfu(flops_per_token: float, peak_tflops: float) -> float:
    """V3's MFU from its reported cost: tokens per GPU-second times training FLOPs per token
    (the same count the plan uses), over the bf16 peak."""
    tokens_per_gpu_second = 1e12 / (V3_GPU_HOURS_PER_TRILLION_TOKENS * 3600)
    return tokens_per_gpu_second * flops_per_token / (peak_tflops * 1e12)
