"""Every Triton kernel of the `triton` backend compiles for Hopper with Triton's real
compiler, on this CPU (launch/triton_build.py): the launches of the doctor's float32
examples, and those of one bf16 training step of `tiny` (float32 and bf16 parameters), whose
bf16 variants the examples never give. The kernel tests run interpreted (TRITON_INTERPRET=1),
which enforces none of the compiler's rules: two kernels that passed them failed to compile on
an H200 (a module-level float read inside a kernel; a loop variable whose shape changed
between (B, n, 1) and (B, 1, n)). Ampere (`--arch 80`) is left to the command: it took the
compiler 5 min cold for the examples alone, against 2 min here for both sets on Hopper."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_every_triton_kernel_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "birkhoff.launch.triton_build", "--arch", "90"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=480)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    report = json.loads(done.stdout)
    failed = [(e["kernel"], e["ops"], e["sm_90"]["error"]) for e in report["kernels"]
              if not e["sm_90"]["ok"]]  # fmt: skip
    assert not failed, failed
    assert done.returncode == 0, done.stderr[-2000:]
    # every op launched kernels (V4 attention: CSA's gathered picks; its FlexAttention calls
    # are compiled by inductor, not kernels of ours)
    assert report["ops_without_launches"] == []
    kernels = {entry["kernel"].rsplit(".", 2)[-2] for entry in report["kernels"]}
    expected = {"triton_engram", "triton_mhc", "triton_mhc_mapping", "triton_moe"}
    expected |= {"triton_sinkhorn", "triton_entry_mass", "triton_gathered_attention"}
    assert expected <= kernels
    # the step's launches: bf16 tensors, which no example hands a kernel but V4 attention's
    # gathered picks (a further call in bf16)
    step = [e for e in report["kernels"] if "tiny bf16 step" in e["ops"]]
    bf16 = [e for e in step if "*bf16" in e["signature"].values()]
    examples = [e for e in report["kernels"] if e not in step]
    assert bf16
    for entry in examples:
        gathered = entry["kernel"].startswith("birkhoff.kernels.triton_gathered_attention.")
        assert gathered or "*bf16" not in entry["signature"].values(), entry["kernel"]
    # the gathered kernels at V4's heads of 512 channels, both ways, float32 and bf16
    wide = {(e["kernel"].rsplit(".", 1)[-1], e["signature"]["q_ptr"]) for e in examples
            if "gathered" in e["kernel"] and e["constexprs"]["BD"] == "512"}  # fmt: skip
    passes = ("_forward_kernel", "_backward_kernel")
    assert wide == {(kernel, dtype) for kernel in passes for dtype in ("*fp32", "*bf16")}
    # 32-bit offsets wrap silently past 2^31 elements (128K tokens of 4 x 7168 streams): every
    # kernel widens its program ids to 64 bits (read off the compiled TTIR)
    narrow = [e["kernel"] for e in report["kernels"] if not e["int64_program_ids"]]
    assert not narrow, narrow
    # a kernel asking more shared memory than Hopper's 227 KiB would fail at launch
    assert max(e["sm_90"]["shared_bytes"] for e in report["kernels"]) <= 227 * 1024


def test_interpreted_mode_is_refused() -> None:
    env = os.environ | {"TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "birkhoff.launch.triton_build"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "unset TRITON_INTERPRET" in done.stdout
