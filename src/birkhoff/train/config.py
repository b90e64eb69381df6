"""The `optim`, `train`, `backend` and `logging` recipe sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from birkhoff import kernels
from birkhoff.errors import require, require_choice
from birkhoff.train import host_malloc
from birkhoff.train.stability_config import AnticipatoryConfig, FaultConfig, SpikeConfig

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("none", "bf16")
WEIGHT_CASTS = ("auto", "per_step", "per_micro_batch")
CONSOLE_MODES = ("auto", "rich", "plain")
WANDB_MODES = ("offline", "online")
COMPILE_BACKENDS = ("inductor", "aot_eager")
BAD_STEP_ACTIONS = ("skip", "fail")
ENGRAM_UPDATES = ("dense", "sparse")
OPTIMIZERS = ("adamw", "muon_v4")
EMBEDDING_UPDATES = ("adamw", "sinkhorn")
MAX_STEPS = 10**12


@dataclass
class OptimConfig:
    """`name`: adamw, or muon_v4 (Muon for the matrices, AdamW for the rest: train/muon.py).
    `schedule`: cosine (warmup, cosine to min), wsd (warmup, stable, linear decay over the
    last `decay_fraction` of steps) or constant (after warmup). `engram_update`: sparse gives
    Engram tables row-sparse gradients and the lazy AdamW row update (train/adamw.py), so a
    step costs what its looked-up rows cost, whatever the table's size."""

    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    engram_update: str = "dense"
    # muon_v4: Muon's momentum and the RMS its updates are scaled to (V4: 0.95, 0.18)
    muon_momentum: float = 0.95
    muon_update_rms: float = 0.18
    # weight decay on the embeddings, norms, mHC biases and gains too, not only on matrices
    # (V4 §2.4: AdamW with wd 0.1 for all it trains; muon_v4.yaml sets it); Engram tables
    # never (the Engram paper's setting), nor the Sinkhorn-balanced update's tables
    decay_all_adamw: bool = False
    # adamw, or sinkhorn: V4.1's Sinkhorn-balanced update for the embedding, the head and the
    # Engram tables (train/sinkhorn_update.py), with its EMA momentum and update RMS
    embedding_update: str = "adamw"
    sinkhorn_momentum: float = 0.95
    sinkhorn_update_rms: float = 0.18

    def validate(self, prefix: str = "optim") -> None:
        require_choice(f"{prefix}.name", self.name, OPTIMIZERS)
        momentum, rms = self.muon_momentum, self.muon_update_rms
        require(0 <= momentum < 1, f"{prefix}.muon_momentum", momentum, "must be in [0, 1)")
        require(rms > 0, f"{prefix}.muon_update_rms", rms, "must be > 0")
        require(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        require(
            0 <= self.min_lr_ratio <= 1,
            f"{prefix}.min_lr_ratio",
            self.min_lr_ratio,
            "must be in [0, 1]",
        )
        require(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(0 <= value < 1, f"{prefix}.{name}", value, "must be in [0, 1)")
        require(self.eps > 0, f"{prefix}.eps", self.eps, "must be > 0")
        require(
            self.grad_clip >= 0,
            f"{prefix}.grad_clip",
            self.grad_clip,
            "must be >= 0 (0 disables clipping)",
        )
        require_choice(f"{prefix}.schedule", self.schedule, SCHEDULES)
        require_choice(f"{prefix}.engram_update", self.engram_update, ENGRAM_UPDATES)
        update, key = self.embedding_update, f"{prefix}.embedding_update"
        require_choice(key, update, EMBEDDING_UPDATES)
        require(update != "sinkhorn" or self.engram_update == "dense", key, update,
                f"needs {prefix}.engram_update=dense (its column norms span every row of a "
                "table)")  # fmt: skip
        momentum, rms = self.sinkhorn_momentum, self.sinkhorn_update_rms
        require(0 <= momentum < 1, f"{prefix}.sinkhorn_momentum", momentum, "must be in [0, 1)")
        require(rms > 0, f"{prefix}.sinkhorn_update_rms", rms, "must be > 0")
        require(self.warmup_steps >= 0, f"{prefix}.warmup_steps", self.warmup_steps, "must be >= 0")
        require(
            0 < self.decay_fraction <= 1,
            f"{prefix}.decay_fraction",
            self.decay_fraction,
            "must be in (0, 1]",
        )


@dataclass
class TrainConfig:
    """`global_batch_size` sequences per optimizer step over all ranks; each rank runs them as
    micro-batches of `micro_batch_size` (gradient accumulation makes up the rest; null: the
    rank's whole share in one micro-batch, or as many as the pipeline needs).
    `on_bad_step`: a step whose loss or gradient norm is not finite is `skip`ped (nothing is
    updated, its data is consumed; after `max_bad_steps` in a row the run fails) or `fail`s.
    `hang_timeout_s`: when no step (or evaluation, or checkpoint) finishes for this long, every
    rank dumps its stacks to RUN_DIR/hang/ and the run fails (null: no watchdog).
    `straggler_warn_ratio`: every `logging.log_every` steps, warn when the slowest rank spent
    this many times the other ranks' median on its own work (null: metrics only)."""

    steps: int = 300
    global_batch_size: int = 16
    # DeepSeek-V3/V4: the MTP loss weight from the start of LR decay (null: model.mtp's
    # throughout), and the last fraction of steps in which router biases no longer move
    mtp_loss_weight_at_decay: float | None = 0.1
    router_bias_freeze_fraction: float = 0.0
    micro_batch_size: int | None = None
    seed: int = 1234
    eval_every: int = 100
    eval_batches: int = 4
    mixed_precision: str = "none"
    # With bf16: the bf16 copies of the weights the matmuls use are made once per step and
    # kept across its micro-batches (per_step; under activation checkpointing the step holds
    # them, 2 bytes per weight), or made again by every micro-batch (per_micro_batch: autocast
    # alone). auto: per_step unless FSDP shards the weights (it gathers them per micro-batch;
    # its parallel.param_dtype=bfloat16 casts the shard before the gather instead).
    weight_casts: str = "auto"
    deterministic: bool = False
    # null: start fresh; auto: the newest complete checkpoint of this run dir (fresh if none);
    # or the path of a checkpoint directory (step-N/).
    resume: str | None = None
    # null, or the weights a fresh run starts from (step 0, new optimizer): a checkpoint
    # directory, or one `birkhoff ckpt export --to safetensors` / `ckpt import --from hf` wrote.
    init_from: str | None = None
    # The lightning indexer's dense warm-up: for the first N steps every CSA layer attends to
    # all its compressed entries and only the indexers learn (train/indexer_warmup.py).
    indexer_warmup_steps: int = 0
    # torch.compile per transformer block (parallel/compile.py); the first step compiles.
    # compile_backend: dynamo's backend, inductor (generated kernels) or aot_eager (the same
    # tracing and autograd graphs run by eager kernels: finds tracing problems in seconds).
    compile: bool = False
    compile_backend: str = "inductor"
    on_bad_step: str = "skip"
    max_bad_steps: int = 10
    hang_timeout_s: float | None = 900
    straggler_warn_ratio: float | None = 1.5
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    anticipatory: AnticipatoryConfig = field(default_factory=AnticipatoryConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def validate(self, dp_size: int, pp: int = 1, prefix: str = "train") -> None:
        self.spike.validate(f"{prefix}.spike")
        self.anticipatory.validate(f"{prefix}.anticipatory")
        self.fault.validate(f"{prefix}.fault")
        mode, key = self.anticipatory.mode, f"{prefix}.anticipatory.mode"
        needs = f"needs {prefix}.spike.enabled=true (spikes switch it on), or use always"
        require(mode != "spike" or self.spike.enabled, key, mode, needs)
        weight, freeze = self.mtp_loss_weight_at_decay, self.router_bias_freeze_fraction
        require(weight is None or weight >= 0, f"{prefix}.mtp_loss_weight_at_decay", weight,
                "must be >= 0, or null to keep model.mtp.loss_weight")  # fmt: skip
        require(
            0 <= freeze < 1, f"{prefix}.router_bias_freeze_fraction", freeze, "must be in [0, 1)"
        )
        require(
            self.indexer_warmup_steps >= 0,
            f"{prefix}.indexer_warmup_steps",
            self.indexer_warmup_steps,
            "must be >= 0",
        )
        if self.init_from is not None:
            require(
                Path(self.init_from).is_dir(),
                f"{prefix}.init_from",
                self.init_from,
                "must be an existing directory (a checkpoint, or an exported or imported one)",
            )
        for name in ("steps", "global_batch_size", "eval_batches", "max_bad_steps"):
            value = getattr(self, name)
            require(value > 0, f"{prefix}.{name}", value, "must be a positive integer")
        require(
            self.steps <= MAX_STEPS,
            f"{prefix}.steps",
            self.steps,
            f"must be <= {MAX_STEPS:.0e} (a step count, not a token count)",
        )
        require(
            self.eval_every >= 0,
            f"{prefix}.eval_every",
            self.eval_every,
            "must be >= 0 (0 evaluates only at the end)",
        )
        require(
            self.hang_timeout_s is None or self.hang_timeout_s > 0,
            f"{prefix}.hang_timeout_s",
            self.hang_timeout_s,
            "must be null (no watchdog) or a positive number of seconds (longer than a step, "
            "an evaluation and a checkpoint save)",
        )
        require(
            self.straggler_warn_ratio is None or self.straggler_warn_ratio > 1,
            f"{prefix}.straggler_warn_ratio",
            self.straggler_warn_ratio,
            "must be null (no warning) or a ratio above 1 (e.g. 1.5)",
        )
        require_choice(f"{prefix}.mixed_precision", self.mixed_precision, PRECISIONS)
        require_choice(f"{prefix}.weight_casts", self.weight_casts, WEIGHT_CASTS)
        require_choice(f"{prefix}.on_bad_step", self.on_bad_step, BAD_STEP_ACTIONS)
        require_choice(f"{prefix}.compile_backend", self.compile_backend, COMPILE_BACKENDS)
        require(
            self.global_batch_size % dp_size == 0,
            f"{prefix}.global_batch_size",
            self.global_batch_size,
            f"must be divisible by the {dp_size} data-parallel ranks",
        )
        if self.micro_batch_size is None:
            self.micro_batch_size = derived_micro_batch(self.global_batch_size // dp_size, pp)
        require(
            self.micro_batch_size > 0,
            f"{prefix}.micro_batch_size",
            self.micro_batch_size,
            "must be a positive integer, or null to derive it",
        )
        per_step = self.micro_batch_size * dp_size
        require(
            self.global_batch_size % per_step == 0,
            f"{prefix}.global_batch_size",
            self.global_batch_size,
            f"must be divisible by train.micro_batch_size ({self.micro_batch_size}) x "
            f"data-parallel ranks ({dp_size}) = {per_step}",
        )

    def grad_accum_steps(self, dp_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp_size)


def derived_micro_batch(per_rank: int, pp: int) -> int:
    """The largest micro-batch that still gives the pipeline `pp` micro-batches per step (the
    whole per-rank batch without pipelining)."""
    fitting = [m for m in range(1, per_rank + 1) if per_rank % m == 0 and per_rank // m >= pp]
    return max(fitting, default=1)


@dataclass
class BackendConfig:
    """`device`: auto | cpu | cuda | npu. `kernels`: which kernel backend runs the hot ops:
    auto (the device's own: triton on CUDA, npu on Ascend, else reference), reference,
    triton or npu (kernels/registry.py)."""

    device: str = "auto"
    kernels: str = "auto"
    # Dense bf16 TFLOP/s of one device, for the `mfu` metric; None: the device's preset, or
    # on the CPU its matmul rate measured once (train/mfu.py).
    peak_tflops: float | None = None
    # The host's C allocator: reuse (freed memory kept for the next step) | system
    # (train/host_malloc.py).
    host_malloc: str = "reuse"

    def validate(self, prefix: str = "backend") -> None:
        require_choice(f"{prefix}.device", self.device, ("auto", "cpu", "cuda", "npu"))
        require(
            self.peak_tflops is None or self.peak_tflops > 0,
            f"{prefix}.peak_tflops",
            self.peak_tflops,
            "must be > 0 (TFLOP/s of one device), or null for the device's own",
        )
        require_choice(f"{prefix}.kernels", self.kernels, kernels.KERNEL_CHOICES)
        require_choice(f"{prefix}.host_malloc", self.host_malloc, host_malloc.CHOICES)
        # an explicit backend: its package imports here, and a chosen device can run it
        kernels.backend_for(self.kernels, None if self.device == "auto" else self.device)


@dataclass
class WandbConfig:
    """Weights & Biases. The API key comes from WANDB_API_KEY only, never from a recipe."""

    enabled: bool = False
    project: str = "birkhoff"
    entity: str | None = None
    name: str | None = None
    mode: str = "offline"
    tags: list[str] = field(default_factory=list)
    group: str | None = None  # runs of one sweep share a group (`birkhoff sweep` sets it)

    def validate(self, prefix: str) -> None:
        require_choice(f"{prefix}.mode", self.mode, WANDB_MODES)
        require(bool(self.project), f"{prefix}.project", self.project, "must be a non-empty name")


@dataclass
class LoggingConfig:
    """Console every `log_every` steps; metrics.jsonl in the run dir each step; wandb if enabled."""

    console: str = "auto"
    log_every: int = 10
    jsonl: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self, prefix: str = "logging") -> None:
        require_choice(f"{prefix}.console", self.console, CONSOLE_MODES)
        require(
            self.log_every > 0, f"{prefix}.log_every", self.log_every, "must be a positive integer"
        )
        self.wandb.validate(f"{prefix}.wandb")
