"""Peak memory of `ckpt import --from hf` and `ckpt export --to hf` against the shard size.

A DeepseekV4 model of ~70 MB (fp32; width 256, 4 layers, 16 experts of 512) is saved by
transformers' `save_pretrained` in shards of a given size and imported, and a birkhoff
checkpoint of the same shape (one training step) is exported with `--max-shard-gib` of the same
size. Each conversion runs in a fresh process with its modules imported first; its peak is the
peak resident set size (Linux VmHWM, reset just before the conversion) minus the resident size
at that moment (file pages mapped while reading count too). Prints one JSON object.

    python benchmarks/checkpoint_exchange_memory.py --shard-mib 4 16 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE = [
    "model=tiny",
    "model.attention.kind=v4",
    "model.hidden_size=256",
    "model.num_heads=4",
    "model.engram.layers=[]",
    "model.moe.first_k_dense=0",
    "model.moe.hash_layers=1",
    "model.moe.num_experts=16",
    "model.moe.expert_ffn_hidden_size=512",
    "model.moe.score_func=sqrt_softplus",
    "model.mtp.depth=0",
]
MEASURE = """
import sys
from pathlib import Path
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from birkhoff.checkpoint.contents import tensor_metadata
from birkhoff.checkpoint.export import export_hf
from birkhoff.checkpoint.hf_import import import_hf

def vm(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

kind, source, out, shard = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
if kind == "import":  # modules and tables loaded on first use, not counted
    get_checkpoint_conversion_mapping("deepseek_v4")
    convert = import_hf
else:
    tensor_metadata(source)
    convert = export_hf
open("/proc/self/clear_refs", "w").write("5")  # restart the peak count here
before = vm("VmRSS:")
convert(source, out, None, shard / 1024)
print((vm("VmHWM:") - before) / 1024)
"""


def measure(kind: str, source: Path, out: Path, shard_mib: float) -> float:
    command = [sys.executable, "-c", MEASURE, kind, str(source), str(out), str(shard_mib)]
    # glibc keeps freed blocks of up to 32 MB mapped after a free raises its threshold: a fixed
    # threshold returns them, so the peak counts live tensors rather than the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{kind} of {source} failed: {result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def largest_file_mib(directory: Path) -> float:
    return max(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**20


def checkpoint(work: Path) -> Path:
    """A birkhoff checkpoint of SHAPE after one training step."""
    run = work / "run"
    train = ["train.steps=1", "train.eval_every=0", "optim.warmup_steps=0", "checkpoint.every=1"]
    command = [sys.executable, "-m", "birkhoff.launch.cli", "train", *SHAPE, *train]
    result = subprocess.run([*command, f"hydra.run.dir={run}"], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"training failed: {result.stderr[-2000:]}")
    return run / "checkpoints" / "step-00000001"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shard-mib", type=float, nargs="+", default=[4.0, 16.0, 64.0])
    args = parser.parse_args()
    import torch
    import transformers

    from birkhoff.checkpoint.hf_deepseek_v4 import hf_config_kwargs, to_hf_state_dict
    from birkhoff.launch.recipe import load_recipe
    from birkhoff.model import build_model
    from birkhoff.model.budget import count_parameters

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        step = checkpoint(work)
        from hydra import compose, initialize_config_module

        with initialize_config_module(config_module="birkhoff.recipes", version_base=None):
            recipe, _ = load_recipe(compose(config_name="config", overrides=SHAPE), env={})
        ours = build_model(recipe.model)
        theirs = transformers.DeepseekV4ForCausalLM(
            transformers.DeepseekV4Config(**hf_config_kwargs(ours.cfg))
        )
        theirs.load_state_dict(to_hf_state_dict(ours), strict=True)
        rows = []
        for shard in args.shard_mib:
            source = work / f"hf-{shard}"
            theirs.save_pretrained(source, max_shard_size=f"{int(shard * 1024)}KB")
            imported = measure("import", source, work / f"imported-{shard}", shard)
            exported = measure("export", step, work / f"exported-{shard}", shard)
            rows.append(
                {
                    "shard_mib": shard,
                    "import_source_largest_file_mib": round(largest_file_mib(source), 2),
                    "import_output_largest_file_mib": round(
                        largest_file_mib(work / f"imported-{shard}"), 2
                    ),
                    "import_peak_mib": round(imported, 1),
                    "export_output_largest_file_mib": round(
                        largest_file_mib(work / f"exported-{shard}"), 2
                    ),
                    "export_peak_mib": round(exported, 1),
                }
            )
        print(
            json.dumps(
                {
                    "benchmark": "checkpoint_exchange_memory",
                    "torch": torch.__version__,
                    "model_mib": round(count_parameters(ours.cfg).total * 4 / 2**20, 1),
                    "largest_tensor_mib": round(
                        max(t.numel() * t.element_size() for t in ours.state_dict().values())
                        / 2**20,
                        2,
                    ),
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
