#!/usr/bin/env bash
# GPU check, ready for a CUDA machine (the project's CI and dev machines have no GPU):
#   bash benchmarks/gpu_check.sh [--workdir DIR] [--epochs N]
# Installs nothing: run it in the project's venv (`make install`) on a machine whose torch
# 2.13.0 build has CUDA (the components-cuda image). Writes results/gpu-check.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch has no CUDA device here')"
exec "$PY" benchmarks/gpu_check.py "$@"
