"""DeepSeek-V4's attention core (the `v4_attention` op) on the `triton` backend (FlexAttention,
compiled) against the `reference` one, measured in the same run on a CUDA device: forward +
backward seconds (median) and the forward's alone, peak device memory above the inputs, and
each backend's largest difference of the output and of every input gradient from the
reference run in float32 on the same (bf16-rounded) inputs, relative to that oracle's largest
value. V4-Flash
shapes by default (64 heads of 512, window 128, CSA ratio 4 with top-512, HCA ratio 128),
bfloat16. A case the reference cannot hold is reported as out of memory. For CSA it also
times the indexer's target (`entry_mass`: the attention's mass at each query's picks, summed
over heads, no gradient) on both backends (the triton one is a single kernel; the reference
takes blocks of queries within its memory budget), with the triton one's largest difference
from the reference relative to its largest value. Prints one JSON object.

    python benchmarks/v4_attention_kernels.py --lengths 4096 16384
    python benchmarks/v4_attention_kernels.py --lengths 16384 --kinds csa --csa-forms --no-reference

`--csa-forms` also times, for CSA, the triton backend with the picks forced into
FlexAttention's mask form (`triton_mask`): where the rule gathers them (16K tokens and more at
V4-Flash's shape) that is the entries' FlexAttention call the gathered kernel replaced, and
`forms_speedup` is its time over the kernel's. `--no-reference` leaves out the reference and
its float32 oracle (lengths whose gather they cannot hold).

`--smoke` runs tiny shapes on the CPU to check this script: torch runs FlexAttention unfused
there and refuses its backward, so smoke mode lifts that guard (numbers are not a
measurement), and runs the Triton kernels (entry_mass, the gathered picks) interpreted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from unittest import mock

if "--smoke" in sys.argv:  # on a CPU the Triton kernels run interpreted (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from birkhoff import kernels
from birkhoff.kernels import v4_attention
from birkhoff.kernels.v4_attention import EntryKV
from birkhoff.model.compression import block_entries


def inputs(kind: str, seq: int, args: argparse.Namespace, device: torch.device) -> tuple:
    generator = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.float32 if args.smoke else torch.bfloat16

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    positions = torch.arange(seq, device=device)[None]
    q, kv, sinks = randn(1, seq, args.heads, args.dim), randn(1, seq, args.dim), randn(args.heads)
    entries = None
    if kind != "sliding":
        layout = block_entries(positions, args.csa_ratio if kind == "csa" else args.hca_ratio)
        values = randn(1, layout.start.shape[1], args.dim)
        entries = EntryKV(values, layout)
        if kind == "csa":  # random scores: picks spread over every visible entry
            score = torch.rand(1, seq, values.shape[1], generator=generator).to(device)
            top = score.masked_fill(~layout.visible(positions), -1).topk(args.topk, dim=-1)
            entries = EntryKV(values, layout, top.indices, top.values >= 0)
    return q, kv, positions, sinks, args.window, entries


def widened(case: tuple) -> tuple:
    """The same case in float32 (the oracle both backends are measured against)."""
    q, kv, positions, sinks, window, entries = case
    if entries is not None:
        entries = EntryKV(entries.values.float(), entries.layout, entries.picks, entries.picked)
    return q.float(), kv.float(), positions, sinks.float(), window, entries


def run(backend: str, case: tuple, device: torch.device, repeats: int) -> dict:
    """One backend on one case: its output and gradients (on the CPU), seconds and memory."""
    op = kernels.get("v4_attention", backend)
    q, kv, positions, sinks, window, entries = case
    tensors = [q, kv, sinks] + ([] if entries is None else [entries.values])
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    given = None
    if entries is not None:
        given = EntryKV(leaves[3], entries.layout, entries.picks, entries.picked)
    times = []
    try:
        for _ in range(repeats + 1):  # the first compiles (triton) and is not timed
            _synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = _allocated(device)
            start = time.perf_counter()
            out, lse = op(leaves[0], leaves[1], positions, leaves[2], window, given)
            grads = torch.autograd.grad(out.float().sum(), leaves)  # lse: detached
            _synchronize(device)
            times.append(time.perf_counter() - start)
            peak = _peak(device) - base
    except torch.OutOfMemoryError:
        return {"out_of_memory": True}
    result = {"seconds": statistics.median(times[1:]), "forward_seconds": _forward_seconds(
        op, (leaves[0], leaves[1], positions, leaves[2], window, given), device, repeats
    )}  # fmt: skip
    if device.type == "cuda":
        result["peak_mib"] = peak / 2**20
    result["values"] = [out.detach().float().cpu(), lse.cpu()] + [g.float().cpu() for g in grads]
    return result


def _forward_seconds(op, args: tuple, device: torch.device, repeats: int) -> float:
    """The forward alone (no graph kept), median seconds: with the forward + backward time,
    which half a slow case spends its time in."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            op(*args)
            _synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def entry_mass_row(case: tuple, device: torch.device, repeats: int) -> dict:
    """Both backends' `entry_mass` on a CSA case: median seconds and the triton one's error."""
    q, _, _, _, _, entries = case
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return {"skipped": "the triton kernel needs CUDA or TRITON_INTERPRET=1"}
    # a normaliser of the size a softmax over ~640 keys of unit logits has
    lse = torch.full(q.shape[:3], 7.0, device=device) + 0.1 * torch.rand(q.shape[:3], device=device)
    args = (q, entries.values, entries.picks, entries.picked, lse)
    row, outputs = {}, {}
    for backend in ("reference", "triton"):
        op, times = kernels.get("entry_mass", backend), []
        try:
            for _ in range(repeats + 1):  # the first compiles (triton) and is not timed
                _synchronize(device)
                start = time.perf_counter()
                outputs[backend] = op(*args)
                _synchronize(device)
                times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            row[backend] = {"out_of_memory": True}
            continue
        row[backend] = {"seconds": statistics.median(times[1:])}
    if len(outputs) == 2:
        row["relative_error"] = relative([outputs["triton"]], [outputs["reference"]])
        row["speedup"] = row["reference"]["seconds"] / row["triton"]["seconds"]
    return row


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def relative(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max(
        ((g - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
        for g, e in zip(got, expected, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--kinds", nargs="+", default=["sliding", "hca", "csa"])
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--csa-ratio", type=int, default=4)
    parser.add_argument("--hca-ratio", type=int, default=128)
    parser.add_argument("--topk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--csa-forms", action="store_true",
                        help="CSA: also triton with the picks as FlexAttention's mask")  # fmt: skip
    parser.add_argument("--no-reference", action="store_true",
                        help="leave out the reference and its float32 oracle")  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        from torch.nn.attention import flex_attention

        flex_attention._validate_device = lambda *tensors: None  # unfused CPU backward
        args.lengths, args.heads, args.dim, args.topk, args.repeats = [300], 4, 16, 8, 1
        args.window, args.hca_ratio = 32, 16
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("v4_attention_kernels: needs a CUDA device (or --smoke on the CPU)")
    else:
        device = torch.device("cuda")
    rows = []
    for seq in args.lengths:
        for kind in args.kinds:
            case = inputs(kind, seq, args, device)
            row = {"kind": kind, "seq": seq}
            if case[-1] is not None and case[-1].picks is not None:
                row["picks_gathered"] = not case[-1].as_mask(args.heads, args.dim)
            backends = ("triton",) if args.no_reference else ("reference", "triton")
            for backend in backends:
                row[backend] = run(backend, case, device, args.repeats)
            if kind == "csa" and args.csa_forms:
                with mock.patch.object(v4_attention, "picks_as_mask", lambda *_: True):
                    masked = row["triton_mask"] = run("triton", case, device, args.repeats)
                if "values" in masked and "values" in row["triton"]:
                    row["forms_speedup"] = masked["seconds"] / row["triton"]["seconds"]
                    row["forms_difference"] = relative(row["triton"]["values"], masked["values"])
                masked.pop("values", None)
            ref, flex = row.get("reference", {}), row["triton"]
            oracle = {} if args.no_reference else run("reference", widened(case), device, 1)
            if "values" in ref and "values" in flex and "values" in oracle:
                row["relative_error"] = relative(flex["values"], oracle["values"])
                row["reference_error"] = relative(ref["values"], oracle["values"])
                row["speedup"] = ref["seconds"] / flex["seconds"]
                if "peak_mib" in ref:
                    row["memory_ratio"] = ref["peak_mib"] / max(flex["peak_mib"], 1e-9)
            for result in (ref, flex):
                result.pop("values", None)
            if kind == "csa" and not args.no_reference:
                row["entry_mass"] = entry_mass_row(case, device, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    print(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
