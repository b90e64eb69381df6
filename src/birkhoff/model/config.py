"""The `model` recipe section."""

from __future__ import annotations

from dataclasses import dataclass

from birkhoff.errors import require, require_choice

ARCHITECTURES = ("dense",)


@dataclass
class ModelConfig:
    """Decoder shape. `dense` is a pre-norm GQA + RoPE + SwiGLU decoder."""

    architecture: str = "dense"
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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self, prefix: str = "model") -> None:
        require_choice(f"{prefix}.architecture", self.architecture, ARCHITECTURES)
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
