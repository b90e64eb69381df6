"""mHC's stream read, stream merge and both Sinkhorn forms as the reference runs them in eager
mode (kernels/mhc_reference.py: autograd Functions with the backward written out, and one
log_softmax per log-space normalisation) against the plain-autograd forms they replaced (a
matmul and a broadcast product differentiated by autograd; logsumexp and a subtraction; V4's
linear-space iterations differentiated by autograd as backward recomputes them), in one
process: one residual join's ops forward and backward at the model's shape, and whole
training steps (forward, backward, AdamW) of the model with either form, alternating round
by round with the plain-residual model, so each form's mHC overhead has its baseline from
the same rounds. `--former` names the ops that take their former form (default: all).
Prints one JSON object.

    python benchmarks/mhc_stream_ops.py --models tiny small --rounds 3
    python benchmarks/mhc_stream_ops.py --models tiny --former sinkhorn_eps
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from model_throughput import SHAPES, VARIANTS, build, step

from birkhoff.kernels import mhc_reference
from birkhoff.model.mhc import HyperConnection, StreamReadout


def former_pre(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    return (h_pre.to(streams.dtype).unsqueeze(-2) @ streams).squeeze(-2)


def former_post(streams, layer_out, h_res, h_post) -> torch.Tensor:
    with torch.autocast(streams.device.type, enabled=False):
        dtype = streams.dtype
        update = h_post.to(dtype).unsqueeze(-1) * layer_out.to(dtype).unsqueeze(-2)
        return h_res.to(dtype) @ streams + update


def _former_log_iterations(logits: torch.Tensor, iters: int) -> torch.Tensor:
    batch_shape, n = logits.shape[:-2], logits.shape[-1]
    log_m = logits.float().reshape(-1, n, n).permute(1, 2, 0).contiguous()
    for _ in range(iters):
        log_m = log_m - torch.logsumexp(log_m, dim=0, keepdim=True)
        log_m = log_m - torch.logsumexp(log_m, dim=1, keepdim=True)
    return log_m.exp().permute(2, 0, 1).contiguous().view(*batch_shape, n, n).to(logits.dtype)


def former_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    return mhc_reference._recomputed_in_backward(logits, _former_log_iterations, iters)


def former_sinkhorn_eps(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    return mhc_reference._recomputed_in_backward(logits, mhc_reference._sinkhorn_eps, iters, eps)


CURRENT = {
    "pre": mhc_reference.mhc_pre,
    "post": mhc_reference.mhc_post,
    "sinkhorn": mhc_reference.sinkhorn_knopp,
    "sinkhorn_eps": mhc_reference.sinkhorn_knopp_eps,
}
FORMER = {
    "pre": former_pre,
    "post": former_post,
    "sinkhorn": former_sinkhorn,
    "sinkhorn_eps": former_sinkhorn_eps,
}
FORMS = {"current": CURRENT, "former": dict(CURRENT)}  # "former": filled in by --former


def use(net: torch.nn.Module, form: str) -> None:
    ops = FORMS[form]
    pre, post = ops["pre"], ops["post"]
    # mhc_mapping looks both Sinkhorn forms up at call time
    mhc_reference.sinkhorn_knopp = ops["sinkhorn"]
    mhc_reference.sinkhorn_knopp_eps = ops["sinkhorn_eps"]
    for module in net.modules():
        if isinstance(module, HyperConnection):
            module._pre, module._post = pre, post
            module._read = mhc_reference.composed_read(mhc_reference.mhc_mapping, pre)
            module._merge_read = mhc_reference.composed_merge_read(post, module._read)
        elif isinstance(module, StreamReadout):
            module._pre = pre


def join_ms(net: torch.nn.Module, tokens: tuple[int, int], rounds: int) -> dict[str, float]:
    """One join (the first block's first) around a cheap sublayer, forward and backward."""
    join = next(m for m in net.modules() if isinstance(m, HyperConnection))
    n, c = net.cfg.residual.n_streams, net.cfg.hidden_size
    streams = torch.randn(*tokens, n, c, requires_grad=True)
    grad = torch.randn_like(streams)
    seconds = dict.fromkeys(FORMS, 0.0)
    for r in range(rounds + 1):
        for name in FORMS:
            use(net, name)
            start = time.perf_counter()
            for _ in range(5):
                join(streams, lambda x: 2.0 * x).backward(grad)
            seconds[name] += (time.perf_counter() - start) if r else 0.0
    return {name: 1e3 * s / (5 * rounds) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--former", nargs="+", default=list(FORMER), choices=list(FORMER))
    args = parser.parse_args()
    FORMS["former"] |= {op: FORMER[op] for op in args.former}
    result = {"benchmark": "mhc_stream_ops", "torch": torch.__version__, "former": args.former}
    result["models"] = {}
    cpu = torch.device("cpu")
    for model in args.models:
        net, optimizer = build(model, VARIANTS["default"], False, "reference", cpu)
        plain, plain_optimizer = build(model, VARIANTS["plain"], False, "reference", cpu)
        batch, seq = SHAPES[model]
        joins = join_ms(net, (batch, seq), args.rounds)
        tokens = torch.randint(
            0, net.cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0)
        )
        seconds = dict.fromkeys([*FORMS, "plain"], 0.0)
        for r in range(args.rounds + 1):  # the first round warms up
            for name in seconds:
                if name != "plain":
                    use(net, name)
                target, opt = (plain, plain_optimizer) if name == "plain" else (net, optimizer)
                start = time.perf_counter()
                for _ in range(2):
                    step(target, opt, tokens, False)
                seconds[name] += (time.perf_counter() - start) if r else 0.0
        use(net, "current")
        steps = {name: s / (2 * args.rounds) for name, s in seconds.items()}
        result["models"][model] = {
            "form": net.cfg.residual.form,
            "join_forward_backward_ms": joins,
            "join_ratio": joins["current"] / joins["former"],
            "step_s": steps,
            "step_ratio": steps["current"] / steps["former"],
            "mhc_overhead": {f: steps[f] / steps["plain"] - 1 for f in FORMS},
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
