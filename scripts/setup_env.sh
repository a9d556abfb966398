#!/usr/bin/env bash
# Creates .venv with the pinned environment of requirements-dev.txt and installs mae_fast into it
# (editable). setup.py builds the CUDA extension when torch is a CUDA build, nvcc is found and a GPU is
# visible or TORCH_CUDA_ARCH_LIST is set; MAE_FAST_BUILD_CUDA=1 makes a failed build an error.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -r requirements-dev.txt
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
.venv/bin/pip install -q --no-build-isolation --no-deps -e .
