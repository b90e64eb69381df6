"""Engram: tokenizer compression, n-gram hashing, gating, table param group, validation, row-sparse
table gradients."""

import subprocess
import sys

import pytest
import torch

from birkhoff.data.compression import compression_table
from birkhoff.errors import RecipeError
from birkhoff.kernels.causal_conv import causal_conv
from birkhoff.kernels.reference import engram_gather_gate, engram_hash
from birkhoff.model import build_model
from birkhoff.model.config import EngramConfig
from birkhoff.model.engram import Engram, hash_layout, sparse_table_gradients
from birkhoff.parallel.distributed import DistributedContext
from birkhoff.parallel.grad_norm import clip_grad_norm
from birkhoff.parallel.sparse_rows import materialise
from birkhoff.train.optim import param_groups
from conftest import small_model

CFG = EngramConfig(layers=[0], max_ngram=3, heads_per_order=4, table_size=1000, embed_dim=8)


def make_engram(
    streams: int = 4, compression: torch.Tensor | None = None, backend: str = "reference"
) -> Engram:
    torch.manual_seed(0)
    table = torch.arange(64) if compression is None else compression
    return Engram(16, streams, CFG, 0, table, backend, 1e-6)


def test_compression_merges_case_accent_and_space_variants():
    pieces = [
        "<unk>",
        "\u2581The",
        "the",
        "\u2581th\u00e9",
        "THE",
        "\u2581dog",
        "\uff54\uff48\uff45",
    ]
    table = compression_table(pieces).tolist()
    assert table[1] == table[2] == table[3] == table[4] == table[6]  # incl. full-width NFKC
    assert len({table[0], table[1], table[5]}) == 3


# hash_layout(PINNED_CFG, layer=1), computed once: a change to how layouts are drawn would
# silently send every trained table row somewhere else.
PINNED_CFG = EngramConfig(layers=[1], max_ngram=3, heads_per_order=2, table_size=50, seed=7)
PINNED_MULTIPLIERS = [3052478244805074963, 2107355621126328931, 3927947020917975239]
PINNED_PRIMES = [[53, 59], [61, 67]]
# rows_by_hand([5, 17, 17, 3, 250, 9, 0, 42], pad 11) with the pinned layout, computed once.
PINNED_ROWS = [
    [23, 76, 166, 222], [23, 58, 151, 220], [32, 85, 128, 206], [1, 102, 130, 178],
    [8, 78, 161, 182], [40, 54, 127, 176], [42, 91, 150, 234], [15, 70, 129, 237],
]  # fmt: skip


def rows_by_hand(
    ids: list[int], pad: int, multipliers: list[int], primes: list[list[int]]
) -> list[list[int]]:
    """The Engram paper's n-gram hash with Python integers, one position at a time: for order
    n, the XOR of the last n compressed ids, each times its multiplier with int64
    wrap-around (ids before the sequence are `pad`), then per head mod its prime plus the
    head's first row (the primes of the heads before it, summed)."""
    flat = [prime for order in primes for prime in order]
    first_rows = [sum(flat[:head]) for head in range(len(flat))]
    rows = []
    for t in range(len(ids)):
        context = [ids[t - j] if t >= j else pad for j in range(len(multipliers))]
        heads: list[int] = []
        for n in range(2, len(multipliers) + 1):
            mix = 0
            for j in range(n):
                mix ^= (context[j] * multipliers[j] + 2**63) % 2**64 - 2**63
            for prime in primes[n - 2]:
                heads.append(mix % prime + first_rows[len(heads)])
        rows.append(heads)
    return rows


def test_hash_equals_the_papers_hash_computed_by_hand():
    multipliers, primes, offsets = hash_layout(PINNED_CFG, 1)
    assert multipliers.tolist() == PINNED_MULTIPLIERS and primes.tolist() == PINNED_PRIMES
    ids = [[5, 17, 17, 3, 250, 9, 0, 42], [2**40 + 3, 1, 1, 1, 7, 7, 7, 7]]
    by_hand = [rows_by_hand(row, 11, PINNED_MULTIPLIERS, PINNED_PRIMES) for row in ids]
    assert by_hand[0] == PINNED_ROWS
    computed = engram_hash(torch.tensor(ids), multipliers, primes, offsets, 11)
    assert computed.tolist() == by_hand


def test_hash_rows_stay_inside_each_heads_table():
    engram = make_engram()
    rows = engram.hash_tokens(torch.randint(0, 64, (4, 50)))
    assert rows.shape == (4, 50, 8)
    low = engram.offsets.flatten()
    high = low + engram.primes.flatten()
    assert ((rows >= low) & (rows < high)).all()
    assert int(high.max()) == engram.table.num_embeddings
    assert len(set(engram.primes.flatten().tolist())) == 8
    assert all(p >= 1000 for p in engram.primes.flatten().tolist())


def test_hash_changes_when_any_token_of_the_ngram_changes():
    engram = make_engram()
    tokens = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(1))
    base = engram.hash_tokens(tokens)
    t = 10
    for back in range(3):  # change token t - back
        changed = tokens.clone()
        changed[0, t - back] = (changed[0, t - back] + 1) % 64
        rows = engram.hash_tokens(changed)
        for order in (2, 3):
            heads = slice((order - 2) * 4, (order - 1) * 4)
            differs = (rows[0, t, heads] != base[0, t, heads]).all()
            assert bool(differs) == (back < order), (back, order)
    assert torch.equal(engram.hash_tokens(tokens), base), "deterministic"


def test_compressed_variants_hash_alike():
    compression = torch.arange(64)
    compression[40] = compression[41]  # say 40 and 41 are case variants of one word
    engram = make_engram(compression=compression)
    a = torch.tensor([[5, 40, 7]])
    b = torch.tensor([[5, 41, 7]])
    assert torch.equal(engram.hash_tokens(a), engram.hash_tokens(b))


def test_hash_layout_is_identical_across_processes():
    code = (
        "from birkhoff.model.config import EngramConfig; from birkhoff.model.engram import "
        "hash_layout; m, p, o = hash_layout(EngramConfig(heads_per_order=4, table_size=1000), 2);"
        "print(m.tolist(), p.tolist(), o.tolist())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    m, p, o = hash_layout(EngramConfig(heads_per_order=4, table_size=1000), 2)
    assert other == f"{m.tolist()} {p.tolist()} {o.tolist()}"
    assert all(int(x) % 2 == 1 for x in m)
    assert not torch.equal(hash_layout(EngramConfig(), 3)[0], hash_layout(EngramConfig(), 2)[0])


def test_gate_follows_the_formula_and_the_conv_starts_as_a_no_op():
    engram = make_engram()
    tokens = torch.randint(0, 64, (2, 6))
    streams = torch.randn(2, 6, 4, 16)
    out = engram(streams, tokens)
    memory = engram.table(engram.hash_tokens(tokens)).flatten(-2)
    keys = engram.key(memory).unflatten(-1, (4, 16))
    value = engram.value(memory)
    dot = (
        torch.nn.functional.rms_norm(streams, (16,), eps=1e-6)
        * torch.nn.functional.rms_norm(keys, (16,), eps=1e-6)
    ).sum(-1) / 4.0
    alpha = torch.sigmoid(torch.sign(dot) * dot.abs().sqrt())
    torch.testing.assert_close(
        out, streams + alpha.unsqueeze(-1) * value.unsqueeze(-2), atol=1e-5, rtol=1e-5
    )


def test_tables_get_their_own_lr_and_no_weight_decay():
    model = build_model(
        small_model(
            vocab_size=64,
            engram=EngramConfig(layers=[1], lr_multiplier=5.0, table_size=50),
        )
    )
    groups = {g["name"]: g for g in param_groups(model, 0.1, 2e-3)}
    tables = groups["engram_tables"]
    assert tables["params"] == [model.blocks["1"].engram.table.weight]
    assert tables["lr"] == pytest.approx(1e-2) and tables["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"layers": [4]}, "model.engram.layers"),
        ({"layers": [-1]}, "model.engram.layers"),
        ({"layers": [1, 1]}, "model.engram.layers"),
        ({"max_ngram": 1}, "model.engram.max_ngram"),
        ({"table_size": 1}, "model.engram.table_size"),
    ],
)
def test_bad_engram_configs_fail_naming_the_field(changes, key):
    cfg = small_model(
        vocab_size=64,
        num_layers=4,
        engram=EngramConfig(**changes),
    )
    with pytest.raises(RecipeError) as info:
        build_model(cfg)
    assert info.value.key == key


@pytest.mark.parametrize("length", [20, 5, 1])  # 5, 1: lags that reach before the start
@pytest.mark.parametrize("compiled_form", [False, True])
def test_causal_conv_equals_a_depthwise_conv1d_with_left_padding(
    length, compiled_form, monkeypatch
):
    """The convolution (eager: an autograd Function with its backward written out; compiled:
    the plain shifted products) against Conv1d over left-padded channels in float64: output
    and the gradients of input and weight."""
    engram = make_engram().double()
    with torch.no_grad():
        engram.conv_weight.normal_()
    if compiled_form:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(2, length, 4, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, length, 4, 16, dtype=torch.float64)
    kernel, dilation = engram.conv_weight.shape[0], engram.dilation

    def conv1d(x, conv_weight):
        # Conv1d correlates: weight index K-1-i multiplies lag i.
        weight = conv_weight.T.unsqueeze(1).flip(-1)
        channels_first = x.permute(0, 2, 3, 1).reshape(8, 16, length)
        padded = torch.nn.functional.pad(channels_first, ((kernel - 1) * dilation, 0))
        out = torch.nn.functional.conv1d(padded, weight, dilation=dilation, groups=16)
        return out.view(2, 4, 16, length).permute(0, 3, 1, 2)

    inputs = (x, engram.conv_weight)
    got, expected = causal_conv(x, engram.conv_weight, dilation), conv1d(*inputs)
    torch.testing.assert_close(got, expected)
    got_grads = torch.autograd.grad(got, inputs, grad)
    for got_grad, want in zip(got_grads, torch.autograd.grad(expected, inputs, grad), strict=True):
        torch.testing.assert_close(got_grad, want)


def test_the_left_edge_is_padded_with_the_compressed_pad_id():
    engram = make_engram()
    tokens = torch.tensor([[11, 12, 13]])
    padded = torch.tensor([[3, 3, 11, 12, 13]])  # PAD_ID = 3 before the sequence
    torch.testing.assert_close(engram.hash_tokens(tokens), engram.hash_tokens(padded)[:, 2:])


def test_forward_with_a_trained_conv_applies_norm_conv_and_silu():
    engram = make_engram()
    with torch.no_grad():
        engram.conv_weight.normal_()
        engram.conv_norm_weight.uniform_(0.5, 1.5)
    tokens, streams = torch.randint(0, 64, (2, 9)), torch.randn(2, 9, 4, 16)
    gated = engram_gather_gate(
        engram.table.weight,
        engram.hash_tokens(tokens),
        engram.key.weight,
        engram.value.weight,
        streams,
        1e-6,
    )
    normed = torch.nn.functional.rms_norm(gated, (16,), engram.conv_norm_weight, 1e-6)
    conv = causal_conv(normed, engram.conv_weight, engram.dilation)
    expected = streams + gated + torch.nn.functional.silu(conv)
    torch.testing.assert_close(engram(streams, tokens), expected)


def test_whitespace_runs_share_one_canonical_id():
    table = compression_table(["\u2581", "\u2581\u2581", "\t", "\n", "a"]).tolist()
    assert table[0] == table[1] == table[2] == table[3] != table[4]


def test_sparse_table_gradients_are_the_dense_ones_and_clip_alike():
    """optim.engram_update=sparse changes how the table's gradient is held, not its value:
    the same model's dense gradient (F.embedding's backward into the whole table), and the
    same clipping norm and clipped gradients."""
    cfg = small_model(vocab_size=64, engram=EngramConfig(layers=[1], table_size=50))
    tokens = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    results = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg)
        if sparse:
            assert sparse_table_gradients(model) == [model.blocks["1"].engram.table.weight]
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        params = list(model.parameters())
        norm = clip_grad_norm(params, 0.01, DistributedContext(0, 0, 1, None))
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((norm, grads))
    (dense_norm, dense), (sparse_norm, sparse) = results
    table = "blocks.1.engram.table.weight"
    assert sparse[table].is_sparse and not dense[table].is_sparse
    assert sparse[table].coalesce().indices().numel() < dense[table].shape[0]  # rows looked up
    assert sparse_norm.item() == pytest.approx(dense_norm.item(), rel=1e-6)
    assert sparse.keys() == dense.keys()
    for name, grad in dense.items():
        got = sparse[name].to_dense() if sparse[name].is_sparse else sparse[name]
        torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("host", [False, True])
def test_host_tables_are_materialised_on_the_host_only(host):
    """parallel.engram_host: the tables get host storage, the rest the device's (the meta
    device stands in for an accelerator here); without it everything goes to the device."""
    cfg = small_model(vocab_size=64, engram=EngramConfig(layers=[0, 1], table_size=50))
    with torch.device("meta"):
        model = build_model(cfg)
    materialise(model, torch.device("meta"), host)
    tables = {f"blocks.{i}.engram.table.weight" for i in (0, 1)}
    for name, param in model.named_parameters():
        expected = "cpu" if host and name in tables else "meta"
        assert param.device.type == expected, name
