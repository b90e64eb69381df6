"""`birkhoff plan [overrides] [--json] [--top N]`: the layouts of a
recipe on a cluster that need not exist here (parallel/planning/), fastest first, with
per-device memory, bytes per collective, step time and MFU. With `parallel.*` overrides it
checks that one layout instead: whether it fits, and what dominates its step."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
from omegaconf import OmegaConf

from birkhoff import kernels
from birkhoff.errors import RecipeError, require
from birkhoff.launch.recipe import Recipe, compose_recipe, typed_recipe
from birkhoff.parallel.planning.cluster import PRESET_KERNELS, Cluster, cluster_from
from birkhoff.parallel.planning.counted_ops import LEFT_ON_REFERENCE
from birkhoff.parallel.planning.estimate import Estimate, estimate, model_flops_per_token
from birkhoff.parallel.planning.inventory import Inventory, build_inventory
from birkhoff.parallel.planning.launches import count_launches
from birkhoff.parallel.planning.layout import Layout, Workload, layout_of
from birkhoff.parallel.planning.published import (
    deepseek_v3_model,
    deepseek_v3_run,
    derived_mfu,
)
from birkhoff.parallel.planning.search import check_runnable, plan
from birkhoff.parallel.planning.traffic import ACTIVATION_TRAFFIC, activation_traffic
from birkhoff.train.config import derived_micro_batch
from birkhoff.train.optim import build_optimizer

# What picks one layout to check rather than a search (other parallel.* keys are settings).
DEGREES = ("dp_replicate", "dp_shard", "tp", "pp", "ep")
LAYOUT_KEYS = {"parallel", *(f"parallel.{key}" for key in DEGREES)}
GIB_COLUMNS = ("params", "grads", "optimizer", "activations", "buffers", "weight_casts", "total")


def plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="birkhoff plan",
        description="Memory per device, bytes per collective, step time and MFU of a recipe's "
        "layouts on a cluster (cluster.preset=h100 cluster.devices=256, or the figures); with "
        "parallel.* degrees or parallel=NAME, that one layout.",
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides, cluster.* included")
    parser.add_argument("--json", action="store_true", help="every estimate as JSON")
    parser.add_argument("--top", type=int, default=10, help="layouts shown (10)")
    parser.add_argument(
        "--fused-attention",
        action="store_true",
        help="plan for attention kernels that keep no score matrix (the reference ones do)",
    )
    parser.add_argument(
        "--launches",
        action="store_true",
        help="count the model's eager kernel launches with the kernels backend.kernels runs "
        "(auto: triton on NVIDIA presets, else the reference; a narrowed copy, two short "
        "sequences, on this CPU: seconds for tiny, minutes and 8 GB for V4-Flash) and take "
        "the host's time for them into the step",
    )
    parser.add_argument(
        "--published",
        choices=["deepseek_v3"],
        help="hold the model against a published run instead of a recipe",
    )
    return parser


def plan_command(args: list[str]) -> int:
    """Errors are one line naming the key, exit code 2, before any estimate runs."""
    options = plan_parser().parse_args(args)
    try:
        if options.published:
            return _published(options.json)
        overrides = options.overrides
        recipe = typed_recipe(compose_recipe(overrides))
        cluster = cluster_from(cluster_values(recipe))
        recipe.model.validate()
        attention = attention_kind(recipe, cluster, options.fused_attention)
        work = workload_of(recipe, attention, cluster_kernels(recipe, cluster))
        if options.launches:
            require(
                not recipe.train.compile, "train.compile", True,
                "--launches counts eager launches (compiled blocks launch far fewer): "
                "plan without --launches, or with train.compile=false",
            )  # fmt: skip
            launch_kernels = counted_kernels(recipe, cluster)
        inv = build_inventory(recipe.model)
        chosen = [o for o in overrides if o.split("=")[0] in LAYOUT_KEYS]
        layout = None
        if chosen:
            layout = recipe_layout(recipe, cluster.devices)
            check_runnable(inv, layout, work)
        if options.launches:  # after every check: the count takes seconds to minutes
            counted = count_launches(recipe.model, recipe.data.seq_len,
                                     optimizer=trainer_optimizer(recipe, cluster),
                                     kernels=launch_kernels)  # fmt: skip
            work = replace(work, launches=counted)
        if layout is not None:
            estimates = [estimate(inv, layout, work, cluster)]
        else:
            optim = recipe.optim
            sparse, muon = optim.engram_update == "sparse", optim.name == "muon_v4"
            balanced = optim.embedding_update == "sinkhorn"
            routing = recipe.train.anticipatory.mode == "always"
            estimates = plan(inv, work, cluster, sparse, muon, balanced, host_snapshots(recipe),
                             routing)  # fmt: skip
    except RecipeError as err:
        print(f"birkhoff: {err}", file=sys.stderr)
        return 2
    report = _report(inv, work, cluster, estimates)
    if options.json:
        print(json.dumps(report, indent=1))
    else:
        print(_table(report, options.top))
    return 0


def trainer_optimizer(
    recipe: Recipe, cluster: Cluster
) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    """How the trainer builds its optimizer for a model on the cluster's devices. The copy it
    is counted on lies on a CPU, where the trainer takes AdamW's fused step as on CUDA and
    Ascend (or the loop per tensor where DTensors and plain tensors mix, as everywhere);
    where the cluster's AdamW steps with foreach kernels instead (`cluster.foreach_optimizer`:
    a custom cluster, torch's default on other accelerators), the fused groups step with
    foreach."""

    def build(model: torch.nn.Module) -> torch.optim.Optimizer:
        optimizer, _ = build_optimizer(model, recipe.optim, recipe.train.steps)
        for group in optimizer.param_groups:
            if cluster.foreach_optimizer and group.get("fused"):
                group["fused"], group["foreach"] = None, True
        return optimizer

    return build


def counted_kernels(recipe: Recipe, cluster: Cluster) -> str:
    """The kernel backend whose launches `--launches` counts: `backend.kernels`, `auto` as
    the cluster's devices resolve it (triton on NVIDIA presets; a custom cluster: the
    reference). npu's ops need CANN to run: the reference's are counted for them (the line
    of assumptions says so, launches.py)."""
    requested, chosen = recipe.backend.kernels, cluster_kernels(recipe, cluster)
    require(
        chosen != "cpu", "backend.kernels", requested,
        "the cpu backend runs on CPUs, not on a cluster's accelerators; plan with auto or "
        "reference",
    )  # fmt: skip
    if chosen == "triton":
        require(
            "triton" in kernels.available_backends(), "backend.kernels", requested,
            "counting the triton backend's launches needs the triton package here "
            "(pip install birkhoff[cuda]), or plan with backend.kernels=reference",
        )  # fmt: skip
    return chosen


def recipe_layout(recipe: Recipe, devices: int) -> Layout:
    """The layout the recipe's parallel, optim and train sections run on `devices`."""
    parallel, train, optim = recipe.parallel, recipe.train, recipe.optim
    parallel.validate(devices)
    dp = parallel.resolved_dp(devices)
    micro = train.micro_batch_size or derived_micro_batch(
        train.global_batch_size // dp, parallel.pp
    )
    return layout_of(parallel, micro, devices, optim.engram_update, optim.name,
                     optim.embedding_update, host_snapshots(recipe),
                     recipe.train.anticipatory.mode == "always")  # fmt: skip


def host_snapshots(recipe: Recipe) -> int:
    """The host snapshots the recipe's spike guard keeps (0 without snapshots)."""
    spike = recipe.train.spike
    return spike.snapshots_kept if spike.enabled and spike.snapshot_every > 0 else 0


def attention_kind(recipe: Recipe, cluster: Cluster, fused: bool = False) -> str:
    """What V4 attention keeps for backward on the cluster's devices (planning/layout.py,
    ATTENTION_ACTIVATIONS): a fused kernel's where asked (`--fused-attention`), the npu backend's
    where it runs (`backend.kernels`, `auto` as the cluster's devices resolve it: Ascend
    presets), else the reference kernels'."""
    if fused:
        return "fused"
    return "npu" if cluster_kernels(recipe, cluster) == "npu" else "reference"


def cluster_kernels(recipe: Recipe, cluster: Cluster) -> str:
    """The kernel backend the cluster's devices run: `backend.kernels`, `auto` as the preset
    resolves it (a custom cluster: the reference)."""
    requested = recipe.backend.kernels
    return PRESET_KERNELS.get(cluster.name, "reference") if requested == "auto" else requested


def workload_of(
    recipe: Recipe, attention: str = "reference", kernels: str = "reference"
) -> Workload:
    """What a step of `recipe` computes and moves, as the planner takes it (`kernels`: the
    backend the devices run, cluster_kernels)."""
    train, data, parallel = recipe.train, recipe.data, recipe.parallel
    return Workload(
        global_batch=train.global_batch_size,
        seq_len=data.seq_len,
        mixed_precision=train.mixed_precision == "bf16",
        weight_casts=train.weight_casts,
        param_dtype=parallel.param_dtype,
        reduce_dtype=parallel.reduce_dtype,
        attention=attention,
        kernels=kernels,
        positions=data.document_mask,
        loader_rows=data.engram_in_loader,
    )


def cluster_values(recipe: Recipe) -> dict[str, Any]:
    """The recipe's `cluster` section; devices default to the launch's processes."""
    values = asdict(recipe.cluster)
    if values["devices"] is None:
        values["devices"] = (recipe.launch.nnodes or 1) * recipe.launch.nproc_per_node
    return values


def _report(inv: Inventory, work: Workload, cluster: Cluster, estimates: list[Estimate]) -> dict:
    return {
        "parameters": inv.total,
        "active_parameters": inv.active,
        "engram": bool(inv.cfg.engram.layers),
        "workload": OmegaConf.to_container(OmegaConf.structured(work)),
        "cluster": OmegaConf.to_container(OmegaConf.structured(cluster)),
        "assumptions": assumptions(cluster, work, inv.cfg.residual.mode),
        "layouts": [
            {
                **e.as_dict(),
                "tokens_per_s": work.global_batch * work.seq_len / e.step_s,
                "overrides": e.layout.overrides(),
            }
            for e in estimates
        ],
    }


def assumptions(cluster: Cluster, work: Workload, residual_mode: str) -> str:
    counted = work.kernels if work.kernels in ACTIVATION_TRAFFIC else "reference"
    uncounted = "" if counted == work.kernels else f", not for {work.kernels}'s"
    return (
        f"matmuls at {cluster.matmul_efficiency:g} of the bf16 peak "
        f"(cluster.matmul_efficiency); elementwise kernels' memory traffic at "
        f"{cluster.memory_efficiency:g} of {cluster.memory_gbps:g} GB/s "
        "(cluster.memory_efficiency, memory_gbps), after the matmuls, not beside them, "
        f"the forward and backward's {activation_traffic(work.kernels, residual_mode):g} times "
        f"the bytes autograd saves (counted for the {counted} kernels{uncounted}); "
        + (
            f"eager launches of the {work.launches.kernels} kernels counted"
            + {
                "reference": "",
                "triton": " (V4 attention's core, where the model has it, and the loss as "
                "the reference's: "
                f"{', '.join(LEFT_ON_REFERENCE.values())})",
                "npu": " (as the reference's: torch_npu runs only where CANN is installed)",
            }[work.launches.kernels]
            + f" ({work.launches.once:,} for a "
            "micro-batch with every budgeted loop once, plus each loop's iterations at the "
            f"layout's micro-batch and heads, and {work.launches.optimizer:,} for a "
            "one-process optimizer step, a rank charged only Muon's Newton-Schulz runs it "
            f"owns) at {cluster.launch_us:g} us of host time each "
            "(cluster.launch_us), "
            "the step the slower of host and device; "
            if work.launches is not None
            else "kernel launches and host time not modelled (--launches counts them); "
        )
        + "tp and ep collectives not overlapped with compute, FSDP/HSDP ones overlapped "
        "(only their excess exposed); ring collectives at the node's "
        "links inside a node, the NICs across nodes; the pipeline bubble of the schedule's own "
        "order (forward 1, backward 2 per layer, sends taking no time); "
        + {
            "reference": "V4 attention's activations as the reference kernels keep them "
            "(--fused-attention: a fused kernel's)",
            "fused": "V4 attention's activations as a fused kernel keeps them (a "
            "log-sum-exp per head)",
            "npu": "V4 attention's activations as the npu backend's operators keep them "
            "(FlashAttention's query blocks, keys and mask; CSA's gathered picks in bf16: "
            "the sparse operator's queries, key rows and lists; in bf16 at V4's widths and "
            "tp=1, the CSA indexer's loss as its operator's gradients)",
        }[work.attention]
    )


def _table(report: dict, top: int) -> str:
    layouts = report["layouts"]
    fitting = sum(item["fits"] for item in layouts)
    cl = report["cluster"]
    lines = [
        f"{report['parameters'] / 1e9:.1f}B parameters "
        f"({report['active_parameters'] / 1e9:.1f}B active) on {cl['devices']} x {cl['name']} "
        f"({cl['device_memory_gib']:g} GiB): {fitting} of {len(layouts)} layouts fit",
        f"assumptions: {report['assumptions']}",
        "",
        "| pp | dp_rep | dp_shard | tp | ep | micro | AC | Engram | GiB/device "
        "(par/grad/opt/act/buf/cast) | step s | MFU | tokens/s | dominant | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for item in layouts[:top]:
        lay, mem = item["layout"], item["memory_gib"]
        split = "/".join(f"{mem[k]:.1f}" for k in GIB_COLUMNS[:-1])
        degrees = " | ".join(str(lay[k]) for k in ("dp_replicate", "dp_shard", "tp", "ep"))
        degrees = f"{_pipeline(lay)} | {degrees}"
        lines.append(
            f"| {degrees} | {lay['micro_batch']} | {lay['activation_checkpoint']} "
            f"| {_engram(lay, report['engram'])} | {mem['total']:.1f} ({split}) "
            f"| {item['step_s']:.2f} | {item['mfu']:.1%} "
            f"| {item['tokens_per_s']:,.0f} | {item['dominant']} "
            f"| {'yes' if item['fits'] else 'no'} |"
        )
    host = layouts[0]["memory_gib"].get("host", 0.0) if layouts else 0.0
    if host:
        lines += ["", f"host memory per rank (the first): {host:.3g} GiB (spike snapshots, "
                  "host-resident Engram tables)"]  # fmt: skip
    if layouts and layouts[0]["fits"]:
        lines += ["", "run the first with: " + " ".join(layouts[0]["overrides"])]
    return "\n".join(lines)


def _engram(layout: dict, has_engram: bool) -> str:
    """Where the layout keeps the Engram tables: rows sharded over dp_shard, whole on every
    rank (sparse updates), whole in host memory, or whole because nothing shards them."""
    if not has_engram:
        return "-"
    if layout["engram_host"]:
        return "host"
    return "rows/dp_shard" if layout["engram_row_shard"] else "whole"


def _pipeline(layout: dict) -> str:
    """pp, with its schedule when there is a pipeline (and the chunks per rank)."""
    if layout["pp"] == 1:
        return "1"
    chunks = layout["pp_stages_per_rank"]
    return f"{layout['pp']} {layout['pp_schedule']}" + (f" x{chunks}" if chunks > 1 else "")


def _published(as_json: bool) -> int:
    inv = build_inventory(deepseek_v3_model())
    layout, work, cluster = deepseek_v3_run()
    rows = []
    for checkpoint in ("selective", "full"):
        result = estimate(inv, replace(layout, activation_checkpoint=checkpoint), work, cluster)
        rows.append(result)
    derived = derived_mfu(model_flops_per_token(inv, work), cluster.peak_tflops)
    report = _report(inv, work, cluster, rows)
    report["derived_mfu"] = derived
    report["left_out"] = "DualPipe's overlap of all-to-all with compute; FP8 matmuls; ZeRO-1"
    if as_json:
        print(json.dumps(report, indent=1))
        return 0
    print(_table(report, len(rows)))
    print(
        f"\nDeepSeek-V3 as reported: {derived:.1%} MFU (180K H800 GPU-hours per trillion tokens,"
        f" the plan's FLOPs per token); the plan leaves out {report['left_out']}"
    )
    return 0
