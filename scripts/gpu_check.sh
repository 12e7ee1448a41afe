#!/usr/bin/env bash
# One command for a CUDA machine, at most 10 minutes: device, gpu extra, `pytest -m cuda`, a shrunk momv4 trained
# 50 steps in bf16-mixed (tokens/s, MFU, peak memory), decoding tokens/s. See scripts/gpu_check.py (--help).
#   bash scripts/gpu_check.sh [--layers 6] [--steps 50] [--out gpu_check] [--skip-install] [--dry-run]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3 )}"
exec timeout 600 "$PY" "$REPO/scripts/gpu_check.py" "$@"
