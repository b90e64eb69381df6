"""The `model` recipe section."""

from __future__ import annotations

from dataclasses import dataclass, field

from birkhoff.errors import require, require_choice

RESIDUAL_MODES = ("mhc", "hc", "plain")
MHC_FORMS = ("paper", "v4")
ATTENTION_KINDS = ("gqa", "v4")
V4_LAYER_TYPES = ("sliding", "csa", "hca")
SCORE_FUNCS = ("sigmoid", "sqrt_softplus")


@dataclass
class ResidualConfig:
    """How sublayers are joined: `mhc` (n streams, Sinkhorn-constrained H_res), `hc`
    (unconstrained hyper-connections, for comparison) or `plain` (x + F(x)). mHC's `form`:
    `paper` (log-space Sinkhorn, exact row sums) or `v4` (DeepSeek-V4's code: `eps` added to
    H_pre and to the softmax that starts Sinkhorn, and to every sum it divides by)."""

    mode: str = "mhc"
    form: str = "paper"
    eps: float = 1e-6  # V4's hc_eps; only form=v4 uses it
    n_streams: int = 4
    sinkhorn_iters: int = 20
    alpha_init: float = 0.01
    pre_init_logit: float = 4.0  # b_pre = (+c, -c, ...): stream 0 feeds the layer at init
    res_init_logit: float = 4.0  # b_res = c I: H_res starts near the identity
    tolerance: float = 0.05  # a step fails if an H_res row or column sum is off by more
    stats_tokens: int = 256  # tokens whose composite mapping is tracked each step

    @property
    def streams(self) -> int:
        """Residual streams a token carries: n, or 1 with a plain residual."""
        return 1 if self.mode == "plain" else self.n_streams

    def validate(self, prefix: str) -> None:
        require_choice(f"{prefix}.mode", self.mode, RESIDUAL_MODES)
        require_choice(f"{prefix}.form", self.form, MHC_FORMS)
        if self.form == "v4":
            require(self.mode == "mhc", f"{prefix}.form", self.form, "needs mode=mhc")
            require(self.eps > 0, f"{prefix}.eps", self.eps, "must be > 0 with form=v4")
        require(self.n_streams >= 1, f"{prefix}.n_streams", self.n_streams, "must be >= 1")
        require(
            self.sinkhorn_iters >= 1,
            f"{prefix}.sinkhorn_iters",
            self.sinkhorn_iters,
            "must be >= 1",
        )
        require(self.alpha_init >= 0, f"{prefix}.alpha_init", self.alpha_init, "must be >= 0")
        require(self.tolerance > 0, f"{prefix}.tolerance", self.tolerance, "must be > 0")
        require(self.stats_tokens >= 1, f"{prefix}.stats_tokens", self.stats_tokens, "must be >= 1")


@dataclass
class AttentionConfig:
    """`gqa`: grouped-query attention, model.num_heads query and model.num_kv_heads KV heads of
    hidden_size / num_heads channels. `v4`: DeepSeek-V4's attention (model/v4_attention.py):
    model.num_heads query heads of `head_dim` channels, from a `q_lora_rank` latent, share one
    KV entry per token; RoPE on the last `rope_head_dim` channels; every layer attends over a
    `sliding_window`; `layer_types` (sliding | csa | hca per layer; empty: two sliding layers,
    then csa and hca alternating, as V4-Flash) adds compressed entries: CSA every `csa_ratio`
    tokens, overlapping, of which a lightning indexer (`index_heads` x `index_head_dim`) picks
    `index_topk` per query; HCA every `hca_ratio` tokens, all of them. CSA and HCA layers rotate
    with `compress_rope_theta`, YaRN-scaled when `yarn_factor` > 1. The output projection is
    grouped (`o_groups` groups of heads, each to `o_lora_rank`). The indexer learns only from
    its own loss (KL to the attention over its picks), weighted `index_loss_weight`."""

    kind: str = "gqa"
    head_dim: int = 64
    rope_head_dim: int = 16
    q_lora_rank: int = 96
    o_groups: int = 2
    o_lora_rank: int = 64
    sliding_window: int = 32
    layer_types: list[str] = field(default_factory=list)
    csa_ratio: int = 4
    hca_ratio: int = 32
    compress_rope_theta: float = 160000.0
    yarn_factor: float = 1.0
    yarn_original_seq_len: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    index_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 16
    index_loss_weight: float = 1.0

    def layer_type(self, layer: int) -> str:
        """A layer's attention type; blocks past the schedule (MTP) use the sliding window."""
        return self.layer_types[layer] if layer < len(self.layer_types) else "sliding"

    def validate(self, prefix: str, num_layers: int, num_heads: int) -> None:
        require_choice(f"{prefix}.kind", self.kind, ATTENTION_KINDS)
        if self.kind != "v4":
            return
        for name in (
            "head_dim", "rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
            "sliding_window", "csa_ratio", "hca_ratio", "index_heads", "index_head_dim",
            "index_topk",
        ):  # fmt: skip
            value = getattr(self, name)
            require(value > 0, f"{prefix}.{name}", value, "must be a positive integer")
        require(
            self.rope_head_dim % 2 == 0
            and self.rope_head_dim <= min(self.head_dim, self.index_head_dim),
            f"{prefix}.rope_head_dim",
            self.rope_head_dim,
            f"must be even and <= {prefix}.head_dim={self.head_dim} and "
            f"{prefix}.index_head_dim={self.index_head_dim}",
        )
        require(
            num_heads % self.o_groups == 0,
            f"{prefix}.o_groups",
            self.o_groups,
            f"must divide model.num_heads={num_heads} (each group is whole heads)",
        )
        require(
            self.compress_rope_theta > 0,
            f"{prefix}.compress_rope_theta",
            self.compress_rope_theta,
            "must be > 0",
        )
        require(
            self.yarn_factor >= 1,
            f"{prefix}.yarn_factor",
            self.yarn_factor,
            "must be >= 1 (1: no YaRN; V4: 16)",
        )
        if self.yarn_factor > 1:
            require(
                self.yarn_original_seq_len > 0,
                f"{prefix}.yarn_original_seq_len",
                self.yarn_original_seq_len,
                f"must be > 0 with {prefix}.yarn_factor={self.yarn_factor} (the context length "
                "the frequencies were trained for; V4: 65536)",
            )
            require(
                self.yarn_beta_fast > self.yarn_beta_slow > 0,
                f"{prefix}.yarn_beta_fast",
                self.yarn_beta_fast,
                f"must be > {prefix}.yarn_beta_slow={self.yarn_beta_slow} > 0 (V4: 32 and 1)",
            )
        require(
            self.index_loss_weight > 0,
            f"{prefix}.index_loss_weight",
            self.index_loss_weight,
            "must be > 0 (the indexer learns from nothing else)",
        )
        if not self.layer_types:
            self.layer_types = [
                "sliding" if i < 2 else ("csa" if i % 2 == 0 else "hca") for i in range(num_layers)
            ]
        require(
            len(self.layer_types) == num_layers
            and all(kind in V4_LAYER_TYPES for kind in self.layer_types),
            f"{prefix}.layer_types",
            list(self.layer_types),
            f"must list one of {', '.join(V4_LAYER_TYPES)} for each of the "
            f"model.num_layers={num_layers} layers (or be empty for V4-Flash's schedule)",
        )


@dataclass
class MoEConfig:
    """DeepSeekMoE feed-forward. `num_experts` routed experts (0: dense FFN in every layer),
    `num_shared_experts` always-on experts, each expert a SwiGLU of `expert_ffn_hidden_size`.
    `swiglu_limit`: V4's clamp of every expert's SwiGLU (gate <= limit, linear part in
    [-limit, limit]); null: none. `hash_layers`: the first that many MoE layers (after
    `first_k_dense` dense ones) route by token id through a fixed, seeded and balanced table
    (V4's hash routing; its gate weights still come from the router's scores)."""

    num_experts: int = 0
    num_shared_experts: int = 1
    top_k: int = 2
    expert_ffn_hidden_size: int = 128
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    bias_update_rate: float = 1e-3  # gamma of aux-loss-free balancing
    seq_aux_loss_coef: float = 0.0  # alpha of the sequence-wise balance loss (~1e-4 when on)
    num_groups: int = 1  # group-limited routing: experts split into groups...
    topk_groups: int = 1  # ...and only the best `topk_groups` groups may be chosen
    first_k_dense: int = 1  # the first k layers keep a dense FFN
    swiglu_limit: float | None = None
    hash_layers: int = 0
    hash_seed: int = 0

    def validate(self, prefix: str, num_layers: int) -> None:
        require(self.num_experts >= 0, f"{prefix}.num_experts", self.num_experts, "must be >= 0")
        if self.num_experts == 0:
            return
        require(
            1 <= self.top_k <= self.num_experts,
            f"{prefix}.top_k",
            self.top_k,
            f"must be in [1, {prefix}.num_experts={self.num_experts}]",
        )
        require(
            self.num_shared_experts >= 0,
            f"{prefix}.num_shared_experts",
            self.num_shared_experts,
            "must be >= 0",
        )
        require(
            self.expert_ffn_hidden_size > 0,
            f"{prefix}.expert_ffn_hidden_size",
            self.expert_ffn_hidden_size,
            "must be a positive integer",
        )
        require_choice(f"{prefix}.score_func", self.score_func, SCORE_FUNCS)
        require(self.route_scale > 0, f"{prefix}.route_scale", self.route_scale, "must be > 0")
        require(
            self.bias_update_rate >= 0,
            f"{prefix}.bias_update_rate",
            self.bias_update_rate,
            "must be >= 0",
        )
        require(
            self.seq_aux_loss_coef >= 0,
            f"{prefix}.seq_aux_loss_coef",
            self.seq_aux_loss_coef,
            "must be >= 0",
        )
        require(
            self.num_groups >= 1 and self.num_experts % self.num_groups == 0,
            f"{prefix}.num_groups",
            self.num_groups,
            f"must be >= 1 and divide {prefix}.num_experts={self.num_experts}",
        )
        per_group = self.num_experts // self.num_groups
        require(
            1 <= self.topk_groups <= self.num_groups,
            f"{prefix}.topk_groups",
            self.topk_groups,
            f"must be in [1, {prefix}.num_groups={self.num_groups}]",
        )
        require(
            self.top_k <= self.topk_groups * per_group,
            f"{prefix}.top_k",
            self.top_k,
            f"must be <= topk_groups x experts per group = {self.topk_groups * per_group}",
        )
        require(
            self.swiglu_limit is None or self.swiglu_limit > 0,
            f"{prefix}.swiglu_limit",
            self.swiglu_limit,
            "must be null (no clamp) or > 0 (DeepSeek-V4 uses 10)",
        )
        require(
            0 <= self.first_k_dense <= num_layers,
            f"{prefix}.first_k_dense",
            self.first_k_dense,
            f"must be in [0, model.num_layers={num_layers}]",
        )
        moe_layers = num_layers - self.first_k_dense
        require(
            0 <= self.hash_layers <= moe_layers,
            f"{prefix}.hash_layers",
            self.hash_layers,
            f"must be in [0, {moe_layers}] (the MoE layers: model.num_layers={num_layers} "
            f"minus {prefix}.first_k_dense={self.first_k_dense})",
        )

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_k_dense

    def is_hash_layer(self, layer: int) -> bool:
        return self.is_moe_layer(layer) and layer < self.first_k_dense + self.hash_layers


@dataclass
class EngramConfig:
    """Engram memory in the blocks listed in `layers` (empty: none). Orders 2..max_ngram with
    `heads_per_order` hash heads each; every head has a prime number of rows >= `table_size`,
    each row `embed_dim` wide. Tables train with LR x `lr_multiplier` and no weight decay."""

    layers: list[int] = field(default_factory=list)
    max_ngram: int = 3
    heads_per_order: int = 8
    table_size: int = 1000
    embed_dim: int = 16
    conv_kernel: int = 4
    lr_multiplier: float = 5.0
    seed: int = 0

    @property
    def hash_heads(self) -> int:
        """Hash heads of one Engram layer: the rows a token reads from its table."""
        return (self.max_ngram - 1) * self.heads_per_order

    def validate(self, prefix: str, num_layers: int) -> None:
        for index in self.layers:
            require(
                0 <= index < num_layers,
                f"{prefix}.layers",
                list(self.layers),
                f"every layer index must be in [0, model.num_layers={num_layers})",
            )
        require(
            len(set(self.layers)) == len(self.layers),
            f"{prefix}.layers",
            list(self.layers),
            "must not repeat a layer",
        )
        require(self.max_ngram >= 2, f"{prefix}.max_ngram", self.max_ngram, "must be >= 2")
        for name in ("heads_per_order", "embed_dim", "conv_kernel"):
            value = getattr(self, name)
            require(value >= 1, f"{prefix}.{name}", value, "must be a positive integer")
        require(self.table_size >= 2, f"{prefix}.table_size", self.table_size, "must be >= 2")
        require(
            self.lr_multiplier > 0, f"{prefix}.lr_multiplier", self.lr_multiplier, "must be > 0"
        )


@dataclass
class MTPConfig:
    """Multi-token prediction: `depth` extra blocks, each predicting one token further ahead;
    their mean loss enters the training loss with weight `loss_weight` (0 depth: off)."""

    depth: int = 0
    loss_weight: float = 0.3

    def validate(self, prefix: str) -> None:
        require(self.depth >= 0, f"{prefix}.depth", self.depth, "must be >= 0")
        require(
            self.depth == 0 or self.loss_weight > 0,
            f"{prefix}.loss_weight",
            self.loss_weight,
            f"must be > 0 with {prefix}.depth={self.depth} (unused depths stall DDP); "
            f"set {prefix}.depth=0 to turn MTP off",
        )


@dataclass
class ModelConfig:
    """Decoder: GQA or DeepSeek-V4 attention, SwiGLU or MoE FFNs, joined by (m)HC or plain
    residuals."""

    vocab_size: int = 4096
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    ffn_hidden_size: int = 512
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    # With a budget, the expert count and Engram table size are derived (model/budget.py):
    # `engram_fraction` of the sparse parameters go to Engram tables, the rest to experts.
    sparse_budget: int | None = None
    engram_fraction: float = 0.25

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self, prefix: str = "model") -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            require(value > 0, f"{prefix}.{name}", value, "must be a positive integer")
        require(
            self.ffn_hidden_size > 0,
            f"{prefix}.ffn_hidden_size",
            self.ffn_hidden_size,
            "must be a positive integer",
        )
        require(
            self.max_seq_len > 0,
            f"{prefix}.max_seq_len",
            self.max_seq_len,
            "must be a positive integer",
        )
        require(
            self.hidden_size % self.num_heads == 0,
            f"{prefix}.num_heads",
            self.num_heads,
            f"must divide model.hidden_size={self.hidden_size}",
        )
        require(
            self.head_dim % 2 == 0,
            f"{prefix}.num_heads",
            self.num_heads,
            f"hidden_size/num_heads={self.head_dim} must be even for rotary embeddings",
        )
        require(
            self.num_heads % self.num_kv_heads == 0,
            f"{prefix}.num_kv_heads",
            self.num_kv_heads,
            f"must divide model.num_heads={self.num_heads}",
        )
        require(self.rope_theta > 0, f"{prefix}.rope_theta", self.rope_theta, "must be > 0")
        require(self.norm_eps > 0, f"{prefix}.norm_eps", self.norm_eps, "must be > 0")
        require(self.init_std > 0, f"{prefix}.init_std", self.init_std, "must be > 0")
        self.residual.validate(f"{prefix}.residual")
        self.attention.validate(f"{prefix}.attention", self.num_layers, self.num_heads)
        self.moe.validate(f"{prefix}.moe", self.num_layers)
        self.engram.validate(f"{prefix}.engram", self.num_layers)
        self.mtp.validate(f"{prefix}.mtp")
        require(
            0.0 <= self.engram_fraction <= 1.0,
            f"{prefix}.engram_fraction",
            self.engram_fraction,
            "must be in [0, 1]",
        )
        require(
            self.sparse_budget is None or self.sparse_budget > 0,
            f"{prefix}.sparse_budget",
            self.sparse_budget,
            "must be null (sizes as given) or a positive integer",
        )
