"""Residual connections between sublayers: plain, hyper-connections (HC) and manifold-constrained
hyper-connections (mHC, arXiv 2512.24880).

With n streams x in R^{n x C} per token, a sublayer F is wrapped as
    x_next = H_res x + H_post^T F(H_pre x),
where the mappings come from x' = RMSNorm(vec(x)):
    mhc: H_pre = sigmoid(a_pre x'phi_pre + b_pre), H_post = 2 sigmoid(a_post x'phi_post + b_post),
         H_res = SinkhornKnopp(a_res mat(x'phi_res) + b_res)   (rows sum to 1, columns nearly)
    hc:  H = b + a tanh(x'phi) for each mapping, unconstrained (arXiv 2409.19606).
form=v4 is DeepSeek-V4's code: H_pre + eps, and Sinkhorn in linear space with eps added to the
starting softmax and to every sum it divides by (kernels/mhc_reference.py: sinkhorn_knopp_eps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from birkhoff import kernels
from birkhoff.kernels.reference import normalised_projection
from birkhoff.model.config import ResidualConfig
from birkhoff.model.init import constant
from birkhoff.model.recompute import recomputing

Sublayer = Callable[[torch.Tensor], torch.Tensor]


class PendingMerge(NamedTuple):
    """A sublayer's output not yet merged into the streams it read: the next hyper-connection
    takes the merge with its own read (`mhc_merge_read`)."""

    streams: torch.Tensor
    layer_out: torch.Tensor
    h_res: torch.Tensor
    h_post: torch.Tensor


class PlainResidual(nn.Module):
    """x + F(x): the single-stream baseline."""

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        return x + sublayer(x)


def stream_projection(x: torch.Tensor, proj: nn.Linear, eps: float) -> torch.Tensor:
    """x' phi with x' = RMSNorm(vec(x)) over all n*C values (epsilon `eps`, the model's
    norm_eps as in V4), in fp32 even under autocast: the mappings are small, and H_res feeds
    Sinkhorn, whose logits need the precision."""
    return normalised_projection(x, proj.weight, eps)


def with_pre_eps(weights: torch.Tensor, cfg: ResidualConfig) -> torch.Tensor:
    """H_pre (or the readout's weights) plus what V4's code adds to them; the paper adds
    nothing (and no op runs)."""
    return weights + cfg.eps if cfg.form == "v4" else weights


def _initial_pre_bias(cfg: ResidualConfig) -> torch.Tensor:
    """Stream 0 feeds the sublayer at init, so step 0 behaves like a pre-norm residual."""
    if cfg.mode == "hc":
        return F.one_hot(torch.tensor(0), cfg.n_streams).float()
    bias = torch.full((cfg.n_streams,), -cfg.pre_init_logit)
    bias[0] = cfg.pre_init_logit
    return bias


class HyperConnection(nn.Module):
    """Mixes n residual streams around one sublayer; keeps its latest H_res for monitoring."""

    no_weight_decay = ("alpha", "bias_pre", "bias_post", "bias_res")

    def __init__(
        self, hidden_size: int, cfg: ResidualConfig, kernel_backend: str, eps: float = 1e-6
    ) -> None:
        super().__init__()
        n = cfg.n_streams
        self.cfg, self.eps = cfg, eps
        self.proj = nn.Linear(n * hidden_size, 2 * n + n * n, bias=False)  # phi_pre|post|res
        constant(self, "alpha", lambda: torch.full((3,), cfg.alpha_init))
        constant(self, "bias_pre", lambda: _initial_pre_bias(cfg))
        post_init = 1.0 if cfg.mode == "hc" else 0.0  # H_post = 1 for both modes
        constant(self, "bias_post", lambda: torch.full((n,), post_init))
        res_init = 1.0 if cfg.mode == "hc" else cfg.res_init_logit  # H_res ~ identity
        constant(self, "bias_res", lambda: torch.eye(n) * res_init)
        self._mapping = kernels.get("mhc_mapping", kernel_backend)
        self._read = kernels.get("mhc_read", kernel_backend)
        self._pre = kernels.get("mhc_pre", kernel_backend)
        self._post = kernels.get("mhc_post", kernel_backend)
        self._merge_read = kernels.get("mhc_merge_read", kernel_backend)
        self.last_h_res: torch.Tensor | None = None  # (tokens sampled, n, n), detached
        # worst (|row sum - 1|, |col sum - 1|) in hc mode; (|col sum - 1|,) in mhc (its rows
        # sum to 1 by construction: see stats_of)
        self.last_deviation: torch.Tensor | None = None

    def _mhc_arguments(self) -> tuple:
        """What mhc_mapping and mhc_read take after the streams."""
        form_eps = self.cfg.eps if self.cfg.form == "v4" else None
        biases = (self.bias_pre, self.bias_post, self.bias_res)
        return (self.proj.weight, self.alpha, *biases, self.eps, self.cfg.sinkhorn_iters, form_eps)

    def mappings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H_pre, H_post, H_res) of the streams x (B, T, n, C)."""
        if self.cfg.mode == "mhc":  # one op: RMS, projection, scales, biases, Sinkhorn
            return self._mapping(x, *self._mhc_arguments())
        n = self.cfg.n_streams
        pre, post, res = stream_projection(x, self.proj, self.eps).split([n, n, n * n], dim=-1)
        a_pre, a_post, a_res = self.alpha
        return (
            self.bias_pre + a_pre * torch.tanh(pre),
            self.bias_post + a_post * torch.tanh(post),
            self.bias_res + a_res * torch.tanh(res.unflatten(-1, (n, n))),
        )

    def forward(self, x: torch.Tensor, sublayer: Sublayer) -> torch.Tensor:
        return self.merge(self.open(x, sublayer))

    def open(self, x: torch.Tensor | PendingMerge, sublayer: Sublayer) -> PendingMerge:
        """Reads the streams x, or a previous connection's pending merge taken with the read,
        and runs the sublayer; the merge is left pending (`merge`, or the next `open`)."""
        if self.cfg.mode == "mhc":  # the mappings and the read in one op (fused on cpu)
            # the streams come back as the merge is to take them (on cpu through the read,
            # whose backward then adds the merge's gradient of them in its own pass)
            arguments = self._mhc_arguments()
            if isinstance(x, PendingMerge):
                layer_in, h_post, h_res, x = self._merge_read(*x, *arguments)
            else:
                layer_in, h_post, h_res, x = self._read(x, *arguments)
        else:
            x = self.merge(x) if isinstance(x, PendingMerge) else x
            h_pre, h_post, h_res = self.mappings(x)
            layer_in = self._pre(x, h_pre)
        self._record(h_res.detach())
        return PendingMerge(x, sublayer(layer_in), h_res, h_post)

    def merge(self, pending: PendingMerge) -> torch.Tensor:
        return self._post(*pending)

    def _record(self, h_res: torch.Tensor) -> None:
        """Keep the latest H_res sample and the worst deviation over every training forward
        since the last `residual_stats` call (all micro-batches of a step)."""
        if not self.training or recomputing():
            return
        self.last_h_res = h_res.flatten(0, -3)[: self.cfg.stats_tokens]
        if self.cfg.mode == "mhc":  # the columns': 3 kernels
            sums = h_res.sum(-2).flatten()[None]
        else:  # the rows' and columns': 5 kernels
            sums = torch.stack((h_res.sum(-1), h_res.sum(-2))).flatten(1)
        deviation = torch.linalg.vector_norm(sums - 1, ord=float("inf"), dim=1)  # max |.|
        if self.last_deviation is not None:
            deviation = torch.maximum(deviation, self.last_deviation)
        self.last_deviation = deviation


class StreamReadout(nn.Module):
    """Collapses the n streams into one hidden state for the output head (its own H_pre)."""

    def __init__(
        self, hidden_size: int, cfg: ResidualConfig, kernel_backend: str, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.cfg, self.eps = cfg, eps
        self.proj = nn.Linear(cfg.n_streams * hidden_size, cfg.n_streams, bias=False)
        # 1-D: FSDP shards no scalars
        constant(self, "alpha", lambda: torch.full((1,), cfg.alpha_init))
        constant(self, "bias", lambda: _initial_pre_bias(cfg))
        self._pre = kernels.get("mhc_pre", kernel_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dynamic = stream_projection(x, self.proj, self.eps)
        if self.cfg.mode == "hc":
            weights = self.bias + self.alpha * torch.tanh(dynamic)
        else:
            weights = with_pre_eps(torch.sigmoid(self.alpha * dynamic + self.bias), self.cfg)
        return self._pre(x, weights)


def residual_chain(x: torch.Tensor, steps: Sequence[tuple[nn.Module, Sublayer]]) -> torch.Tensor:
    """x through each (residual, sublayer) in turn. Between hyper-connections each merge is
    left pending and taken with the next read: in mhc mode one op (`mhc_merge_read`: one pass
    each way on the cpu backend, where a merge's output and its gradient are otherwise
    written and read back), in hc mode the merge and then the read."""
    if not all(isinstance(residual, HyperConnection) for residual, _ in steps):
        for residual, sublayer in steps:
            x = residual(x, sublayer)
        return x
    state: torch.Tensor | PendingMerge = x
    for residual, sublayer in steps:
        state = residual.open(state, sublayer)
    return steps[-1][0].merge(state)


def build_residual(
    hidden_size: int, cfg: ResidualConfig, kernel_backend: str, eps: float = 1e-6
) -> nn.Module:
    if cfg.mode == "plain":
        return PlainResidual()
    return HyperConnection(hidden_size, cfg, kernel_backend, eps)


@torch.no_grad()
def residual_stats(model: nn.Module) -> dict[str, float]:
    """Worst H_res row/column-sum deviation since the last call (all training forwards, tokens and
    layers; reading resets it), and the
    gains of the composite residual mapping prod_l H_res_l over the sampled tokens: max abs row
    sum (forward gain) and max abs column sum (backward gain). See `stats_of`."""
    layers = hyper_connections(model)
    if not layers or layers[0].last_h_res is None:
        return {}
    composite = composite_mapping(main_path_connections(model))
    return stats_of(take_deviation(layers), composite, layers[0].cfg.mode)


def hyper_connections(model: nn.Module) -> list[HyperConnection]:
    return [m for m in model.modules() if isinstance(m, HyperConnection)]


def main_path_connections(model: nn.Module) -> list[HyperConnection]:
    """The hyper-connections of the main blocks, in order: the composite mapping's factors
    (an MTP depth branches off the main residual, on fewer positions)."""
    blocks = getattr(model, "blocks", None)
    return hyper_connections(model if blocks is None else blocks)


def take_deviation(layers: list[HyperConnection]) -> torch.Tensor:
    """The worst deviation of `layers` since the last call, (rows, columns) or, in mhc mode,
    (columns,); resets it."""
    deviation = torch.stack([layer.last_deviation for layer in layers]).amax(0)
    for layer in layers:
        layer.last_deviation = None  # the next step's forwards start a new maximum
    return deviation


def composite_mapping(layers: list[HyperConnection]) -> torch.Tensor:
    """prod_l H_res_l (last layer leftmost) over the sampled tokens, in float64."""
    composite = layers[0].last_h_res.double()
    for layer in layers[1:]:
        composite = layer.last_h_res.double() @ composite
    return composite


def stats_of(deviation: torch.Tensor, composite: torch.Tensor, mode: str) -> dict[str, float]:
    """With `mhc`, Sinkhorn's last step normalises the rows: every row sum is 1 to rounding, and
    so is every row sum of a product of such matrices. The row deviation and the forward gain
    cannot move there, so only the columns and the backward gain are reported (and checked);
    unconstrained `hc` reports all four."""
    stats = {"mhc_col_dev": deviation[-1].item()}  # (rows, columns) or (columns,)
    stats["mhc_gain_bwd"] = composite.abs().sum(-2).max().item()
    if mode != "mhc":
        stats["mhc_row_dev"] = deviation[0].item()
        stats["mhc_gain_fwd"] = composite.abs().sum(-1).max().item()
    return stats
