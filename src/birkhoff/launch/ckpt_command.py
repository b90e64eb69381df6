"""`birkhoff ckpt inspect|export|import`: look into a checkpoint, export its weights, or import
a transformers DeepseekV4 checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from birkhoff.checkpoint import CheckpointError
from birkhoff.checkpoint.export import DTYPES, export_hf, export_safetensors
from birkhoff.checkpoint.hf_import import import_hf
from birkhoff.checkpoint.inspect import describe_checkpoint, format_description


def ckpt_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="birkhoff ckpt")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="step, tokens, layout, tensors")
    inspect.add_argument("path", type=Path)
    inspect.add_argument("--json", action="store_true", help="everything, the recipe too")
    export = commands.add_parser("export", help="consolidated weights + config.json")
    export.add_argument("path", type=Path)
    export.add_argument(
        "--to",
        choices=["safetensors", "hf"],
        required=True,
        help="safetensors: birkhoff's names; hf: transformers' DeepseekV4ForCausalLM",
    )
    export.add_argument("--out", type=Path, help="output directory (default: PATH-<to>)")
    export.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights")
    export.add_argument("--max-shard-gib", type=float, default=5.0, help="largest file (5)")
    imported = commands.add_parser("import", help="a transformers DeepseekV4 checkpoint")
    imported.add_argument("--from", dest="source_format", choices=["hf"], required=True)
    imported.add_argument("path", type=Path, help="config.json + safetensors files")
    imported.add_argument("--out", type=Path, help="output directory (default: PATH-birkhoff)")
    imported.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights")
    imported.add_argument("--max-shard-gib", type=float, default=5.0, help="largest file (5)")
    return parser


def ckpt_command(args: list[str]) -> int:
    try:
        parsed = ckpt_parser().parse_args(args)
    except SystemExit as usage:  # argparse printed the usage and the problem
        return int(usage.code or 0)
    try:
        if parsed.command == "inspect":
            info = describe_checkpoint(parsed.path)
            print(json.dumps(info, indent=2) if parsed.json else format_description(info))
            return 0
        if parsed.max_shard_gib <= 0:
            raise CheckpointError(f"--max-shard-gib {parsed.max_shard_gib}: must be > 0")
        if parsed.command == "import":
            out = import_hf(parsed.path, parsed.out, parsed.dtype, parsed.max_shard_gib)
            print(f"birkhoff: imported {parsed.path} to {out}")
            print(
                f"birkhoff: train from it with: birkhoff train train.init_from={out} (and its "
                "model settings: a run with others is refused, naming them)"
            )
            return 0
        export = export_hf if parsed.to == "hf" else export_safetensors
        out = export(parsed.path, parsed.out, parsed.dtype, parsed.max_shard_gib)
    except (CheckpointError, OSError) as err:
        print(f"birkhoff: {err}", file=sys.stderr)
        return 2
    print(f"birkhoff: exported the weights of {parsed.path} to {out}")
    return 0
