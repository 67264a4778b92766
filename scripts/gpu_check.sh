#!/usr/bin/env bash
# GPU check of issue 3 (< 8 minutes on one GPU): scan parity against the reference loop, and bf16
# latency of DiT-XL/2 and LaMamba-Diff-XL at 256x256, batch 1 and 64. Figures go to a JSON file:
#   scripts/gpu_check.sh [OUT.json] [extra options of scripts/gpu_check.py]
# default OUT: $OUT/gpu_check.json when $OUT is set, else ./gpu_check.json.
# Without a GPU, test it with: scripts/gpu_check.sh /tmp/g.json --device cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-${OUT:-.}/gpu_check.json}"
[[ $# -gt 0 ]] && shift

py=python3
[[ -x .venv/bin/python ]] && py=.venv/bin/python
# A bare checkout (no `pip install -e .`): import the core and the built-in plugins from source.
if ! "$py" -c "import harness, harness_lamamba" 2>/dev/null; then
  export PYTHONPATH="$PWD:$PWD/plugins${PYTHONPATH:+:$PYTHONPATH}"
fi

# 470 s hard stop keeps the whole run under 8 minutes; the JSON is rewritten after each figure.
timeout --signal=INT --kill-after=10 470 "$py" scripts/gpu_check.py --out "$out" "$@"
