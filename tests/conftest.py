"""Shared fixtures: one tokenizer/token cache per test session, a small recipe, and composition."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

# Triton kernels run under Triton's interpreter where no GPU is visible. Triton reads this when
# triton.language is first imported (birkhoff's imports pull it in through torch), so it is set
# before anything from birkhoff is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist runs two workers (pyproject's addopts) on CI's two cores: with torch's default
# of a thread per core in each, their OpenMP threads oversubscribe the cores and small ops
# slow down tenfold. One thread per worker, and per process a test starts.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

from omegaconf import DictConfig

from birkhoff.launch.recipe import compose_recipe as recipe_composed
from birkhoff.model import ModelConfig

# A model small enough that a step takes milliseconds; the data is the real shipped corpus.
SMALL_OVERRIDES = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_hidden_size=128",
    "model.moe.expert_ffn_hidden_size=32",
    "model.engram.layers=[1]",
    "model.engram.table_size=500",
    "model.engram.embed_dim=8",
    "data.seq_len=64",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.eval_batches=2",
    "optim=adamw_cosine",  # tests of other parts pin AdamW; Muon has its own (test_muon.py)
    "optim.warmup_steps=2",
    "backend=cpu",
    "backend.kernels=reference",  # the baseline; test_cpu_kernels.py holds the C kernels to it
    "logging.console=plain",
]


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tokenizer and token caches are built once and reused by every test and subprocess."""
    cache = tmp_path_factory.mktemp("birkhoff-cache")
    previous = os.environ.get("BIRKHOFF_CACHE_DIR")
    os.environ["BIRKHOFF_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("BIRKHOFF_CACHE_DIR", None)
    else:
        os.environ["BIRKHOFF_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def shakespeare_shards(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shipped plays as prepared shards, as a `data.sources` override. Their sample order
    is the same for any number of ranks, which the multi-rank equivalence tests need."""
    from birkhoff.data.commands import prepare_sources
    from birkhoff.launch.recipe import load_recipe

    output = tmp_path_factory.mktemp("shards")
    recipe, _ = load_recipe(compose_recipe([f"data.prepare.output_dir={output}"]), env={})
    (prepared,) = prepare_sources(recipe.data, show=False)
    return f"data.sources=[{{path:{prepared}}}]"


def small_model(**changes) -> ModelConfig:
    """A model config of a few thousand parameters for unit tests; `changes` override fields."""
    base = {
        "vocab_size": 50,
        "hidden_size": 16,
        "num_layers": 2,
        "num_heads": 2,
        "num_kv_heads": 1,
        "ffn_hidden_size": 32,
        "max_seq_len": 8,
    }
    return ModelConfig(**{**base, **changes})


def compose_recipe(overrides: list[str] | None = None) -> DictConfig:
    """The recipe `birkhoff train <overrides>` would compose."""
    return recipe_composed(list(overrides or []))


WORDS = [f"{a}{b}{c}" for a in "bcdfgklmnprst" for b in "aeiou" for c in "nrsxy"]


def write_jsonl(path: Path, docs: int, seed: int, field: str = "text") -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as file:
        for _ in range(docs):
            words = rng.choice(WORDS, size=int(rng.integers(20, 120)))
            file.write(json.dumps({field: " ".join(words) + ".\nEnd."}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three JSONL files of generated documents (test_data.py, test_tokenizer_hf.py)."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        write_jsonl(root / f"part-{i}.jsonl", 120, seed=i)
    return root


# float32 kernels against the float64 reference: sums over n streams and C channels
KERNEL_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def compare(op_ref, op_new, inputs: list[torch.Tensor]) -> None:
    """Forward and every input gradient of op_new (float32) against op_ref in float64."""
    exact = [t.detach().double().requires_grad_() for t in inputs]
    given = [t.detach().clone().requires_grad_() for t in inputs]
    expected, got = op_ref(*exact), op_new(*given)
    assert got.dtype == inputs[0].dtype
    torch.testing.assert_close(got.double(), expected, **KERNEL_TOLERANCE)
    grad = torch.randn(expected.shape, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, exact, grad)
    got_grads = torch.autograd.grad(got, given, grad.to(got.dtype))
    for i, (tensor, e, g) in enumerate(zip(given, expected_grads, got_grads, strict=True)):
        assert g.dtype == tensor.dtype, i
        torch.testing.assert_close(
            g.double(), e, **KERNEL_TOLERANCE, msg=lambda m, i=i: f"input {i}: {m}"
        )


def assert_within_own_error(
    got: torch.Tensor, own: torch.Tensor, exact: torch.Tensor, what=""
) -> None:
    """got (float32) against exact (float64), element by element, within twice the float32
    reference's own largest error there (`own`: the reference run in float32), at least 1e-5:
    for sums whose float32 error a summation order moves."""
    bound = max(1e-5, 2 * (own.double() - exact).abs().max().item())
    torch.testing.assert_close(
        got.double(), exact, rtol=1e-5, atol=bound, msg=lambda m: f"{what}: {m}"
    )


def concatenated(op, *options):
    """`op` with `options` after its tensor inputs, its outputs flattened into one tensor (for
    `compare` on ops with several outputs)."""
    return lambda *inputs: torch.cat([out.flatten() for out in op(*inputs, *options)])


def moe_engram_model() -> ModelConfig:
    """A 2-layer mHC model with MoE (4 experts, top-2) and an Engram layer, for the backends'
    model tests."""
    from birkhoff.model.config import EngramConfig, MoEConfig

    return small_model(
        max_seq_len=16,
        vocab_size=64,
        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=8, first_k_dense=1),
        engram=EngramConfig(layers=[1], table_size=50),
    )


def assert_backend_trains_as_reference(
    backend: str, seed: int = 7, cfg: ModelConfig | None = None
) -> None:
    """Loss and every parameter gradient of a model (by default a 2-layer mHC one) built with
    `backend`'s kernels against the same model (same weights, same batch) with the reference
    ones."""
    from birkhoff.model import build_model

    cfg = cfg or small_model(max_seq_len=16)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    results = []
    for name in ("reference", backend):
        model = build_model(cfg, name, seed=seed)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_ref, grads_ref), (loss_got, grads_got) = results
    torch.testing.assert_close(loss_got, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads_got.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads_got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def assert_bf16_trains_as_reference(
    backend: str, cfg: ModelConfig, tokens: torch.Tensor, cosine: float = 0.999
) -> None:
    """Under bf16 autocast (train.mixed_precision=bf16) the model on `backend` against the
    reference backend's (same weights, same batch): loss, gradient direction (cosine above
    `cosine`) and norm within bf16's rounding."""
    from birkhoff.model import build_model

    results = []
    for name in ("reference", backend):
        model = build_model(cfg, name, seed=3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.detach(), grads))
    (loss_ref, grads_ref), (loss_got, grads_got) = results
    torch.testing.assert_close(loss_got, loss_ref, rtol=1e-2, atol=1e-2)
    assert torch.nn.functional.cosine_similarity(grads_got, grads_ref, dim=0) > cosine
    torch.testing.assert_close(grads_got.norm(), grads_ref.norm(), rtol=1e-2, atol=0)


def saved_bytes(module: torch.nn.Module, *inputs: object) -> int:
    """Bytes autograd keeps for backward after one forward `module(*inputs)`, each storage
    once, the module's parameters and buffers left out."""
    kept: dict[int, torch.UntypedStorage] = {}  # holding them keeps addresses unique

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        kept.setdefault(storage.data_ptr(), storage)
        return tensor

    own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(*inputs)
    return sum(s.nbytes() for address, s in kept.items() if address not in own)


@pytest.fixture
def unfused_flex_with_gradients(monkeypatch):
    """FlexAttention's unfused CPU path with its backward (torch refuses it on a CPU; its
    inductor template is forward-only)."""
    import warnings

    from torch.nn.attention import flex_attention

    monkeypatch.setattr(flex_attention, "_validate_device", lambda *tensors: None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


@pytest.fixture
def stand_in(monkeypatch):
    """A stand-in torch_npu (tests/npu_stand_in.py) in sys.modules: the npu backend's ops
    run through it, and it records their calls."""
    import sys

    from npu_stand_in import StandIn

    module = StandIn()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return module
