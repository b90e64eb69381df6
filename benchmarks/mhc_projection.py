"""mHC's normalised projection RMSNorm(vec(x)) phi as the reference computes it, (vec(x) phi) /
rms(vec(x)) (kernels/reference.py: normalised_projection), against the plain form it replaced,
F.rms_norm then F.linear, measured in one process: the op alone (forward and backward at the
model's shape of the streams) and whole training steps (forward, backward, AdamW) of the
model with either form in every mHC mapping and the readout, alternating round by round.
`--compiled-op` also times the op compiled with inductor (the reference traces the same
order in plain ops). Prints one JSON object.

    python benchmarks/mhc_projection.py --models tiny small --rounds 4
    python benchmarks/mhc_projection.py --models small --compiled-op
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from model_throughput import SHAPES, VARIANTS, build, step

import birkhoff.model.mhc as mhc_module
from birkhoff.kernels import reference


def rms_norm_then_linear(streams: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The baseline: the normalised n C vector formed, then projected (float32)."""
    with torch.autocast(streams.device.type, enabled=False):
        flat = streams.flatten(-2).float()
        return F.linear(F.rms_norm(flat, (flat.shape[-1],), eps=eps), weight.float())


FORMS = {"reordered": reference.normalised_projection, "rms_norm_then_linear": rms_norm_then_linear}


def use(form: str) -> None:
    # mhc_mapping (reference) and the stream readout look the function up at call time
    reference.normalised_projection = mhc_module.normalised_projection = FORMS[form]


def op_ms(
    streams: torch.Tensor, weight: torch.Tensor, rounds: int, compiled: bool = False
) -> dict[str, float]:
    grad = torch.randn(*streams.shape[:-2], weight.shape[0])
    forms = {name: torch.compile(f) if compiled else f for name, f in FORMS.items()}
    seconds = dict.fromkeys(forms, 0.0)
    for r in range(rounds + 1):  # the first round warms up (and compiles)
        for name, form in forms.items():
            start = time.perf_counter()
            for _ in range(5):
                form(streams, weight, 1e-6).backward(grad)
            seconds[name] += (time.perf_counter() - start) if r else 0.0
    return {name: 1e3 * s / (5 * rounds) for name, s in seconds.items()}


def step_seconds(model: str, rounds: int) -> dict[str, float]:
    net, optimizer = build(model, VARIANTS["default"], False, "reference", torch.device("cpu"))
    batch, seq = SHAPES[model]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, net.cfg.vocab_size, (batch, seq + 1), generator=generator)
    seconds = dict.fromkeys(FORMS, 0.0)
    for r in range(rounds + 1):
        for name in FORMS:
            use(name)
            start = time.perf_counter()
            for _ in range(2):
                step(net, optimizer, tokens, False)
            seconds[name] += (time.perf_counter() - start) if r else 0.0
    use("reordered")
    return {name: s / (2 * rounds) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--compiled-op", action="store_true")
    args = parser.parse_args()
    result = {"benchmark": "mhc_projection", "torch": torch.__version__, "models": {}}
    for model in args.models:
        net, _ = build(model, VARIANTS["default"], False, "reference", torch.device("cpu"))
        batch, seq = SHAPES[model]
        cfg = net.cfg
        n, c = cfg.residual.n_streams, cfg.hidden_size
        streams = torch.randn(batch, seq, n, c, requires_grad=True)
        weight = (0.02 * torch.randn(2 * n + n * n, n * c)).requires_grad_()
        op = op_ms(streams, weight, args.rounds)
        steps = step_seconds(model, args.rounds)
        result["models"][model] = {
            "op_forward_backward_ms": op,
            "op_ratio": op["reordered"] / op["rms_norm_then_linear"],
            "step_s": steps,
            "step_ratio": steps["reordered"] / steps["rms_norm_then_linear"],
        }
        if args.compiled_op:
            compiled = op_ms(streams, weight, args.rounds, compiled=True)
            result["models"][model]["compiled_op_forward_backward_ms"] = compiled
            ratio = compiled["reordered"] / compiled["rms_norm_then_linear"]
            result["models"][model]["compiled_op_ratio"] = ratio
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
