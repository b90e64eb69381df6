"""cpu backend ops against the reference inside a model, in one process: the modules that call
an op hold it as an attribute (`kernels.get(op, backend)` at build), so the benchmark swaps
that attribute between the reference's and the cpu backend's implementation and times
training steps (forward, backward, AdamW) with the two taking turns step by step, then each
calling module alone (forward and backward on inputs captured from a step, the two again
taking turns). Whole processes on a shared 2-core machine move by up to 40% from run to run;
neighbouring steps of one process do not. Prints one JSON object: median step times, the
median of the paired ratios (cpu step / the reference step next to it), and per module the
median forward and backward times under each implementation.

    python benchmarks/cpu_op_swap.py --model tiny --ops kv_compress:_compress \
        rope_trailing:_rotate --rounds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from model_throughput import SHAPES, build, step

from birkhoff import kernels
from birkhoff.train.host_malloc import apply_host_malloc

NAMES = ("reference", "cpu")


def use(model: torch.nn.Module, ops: list[tuple[str, str]], backend: str) -> None:
    for module in model.modules():
        for op, attribute in ops:
            if attribute in vars(module):  # an instance attribute: the op the module holds
                setattr(module, attribute, kernels.get(op, backend))


def holders(model: torch.nn.Module, ops: list[tuple[str, str]]) -> dict[str, torch.nn.Module]:
    """Every module that holds one of the ops, by class and name."""
    return {
        f"{type(module).__name__} ({name})": module
        for name, module in model.named_modules()
        if any(attr in vars(module) for _, attr in ops)
    }


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _flat(item)]
    return []


def time_modules(model, ops, tokens, rounds) -> dict:
    modules = holders(model, ops)
    captured = {}

    def capture(name: str):
        def hook(module, args, kwargs, out) -> None:  # None: the output stays the module's
            captured.setdefault(name, (args, kwargs))

        return hook

    hooks = [
        module.register_forward_hook(capture(name), with_kwargs=True)
        for name, module in modules.items()
    ]
    use(model, ops, "reference")
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    for hook in hooks:
        hook.remove()
    result = {}
    for name, module in modules.items():
        args, kwargs = captured[name]
        if not args or not args[0].is_floating_point():  # the model itself (its head's
            result[name] = "not timed alone: it takes token ids (the step's times hold it)"
            continue
        times = {backend: [] for backend in NAMES}
        for r in range(rounds + 2):
            for backend in NAMES if r % 2 else NAMES[::-1]:
                use(model, ops, backend)
                first = args[0].detach().clone().requires_grad_()
                start = time.perf_counter()
                outs = [o for o in _flat(module(first, *args[1:], **kwargs)) if o.requires_grad]
                middle = time.perf_counter()
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                if r >= 2:  # warm-up rounds
                    times[backend].append((middle - start, time.perf_counter() - middle))
        result[name] = {
            backend: {
                "forward_ms": round(statistics.median(t[0] for t in pairs) * 1e3, 2),
                "backward_ms": round(statistics.median(t[1] for t in pairs) * 1e3, 2),
            }
            for backend, pairs in times.items()
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--ops", nargs="+", required=True, help="op:attribute pairs")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides")
    args = parser.parse_args()
    ops = [tuple(pair.split(":")) for pair in args.ops]
    apply_host_malloc("reuse")
    torch.manual_seed(0)
    model, optimizer = build(args.model, args.set, False, "cpu", torch.device("cpu"))
    batch, seq = SHAPES[args.model]
    tokens = torch.randint(0, 1000, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    steps = {backend: [] for backend in NAMES}
    for backend in NAMES:  # warm-up
        use(model, ops, backend)
        step(model, optimizer, tokens, False)
    for r in range(args.rounds):
        for backend in NAMES if r % 2 == 0 else NAMES[::-1]:
            use(model, ops, backend)
            start = time.perf_counter()
            step(model, optimizer, tokens, False)
            steps[backend].append(time.perf_counter() - start)
    ratios = sorted(c / r for c, r in zip(steps["cpu"], steps["reference"], strict=True))
    report = {
        "benchmark": "cpu_op_swap",
        "model": args.model,
        "ops": args.ops,
        "threads": torch.get_num_threads(),
        "step_ms": {b: round(statistics.median(t) * 1e3, 1) for b, t in steps.items()},
        "paired_ratio": round(ratios[len(ratios) // 2], 3),
        "modules": time_modules(model, ops, tokens, max(8, args.rounds)),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
