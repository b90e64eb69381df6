#!/usr/bin/env bash
# Installs birkhoff. torch goes first, pinned, so that a CPU machine takes the CPU build
# instead of pulling the CUDA stack through an unpinned dependency. TORCH_INDEX_URL, if set,
# is where torch comes from (the Ascend image takes the CPU build: torch_npu adds the device).
# Usage: bash install.sh [extras]   e.g. bash install.sh dev   or   bash install.sh dev,cuda
set -euo pipefail
extras="${1:-dev}"
python3 -m pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
python3 -m pip install -e ".[${extras}]"
