#!/usr/bin/env bash
# Creates .venv with the pinned environment of requirements-dev.txt and installs mae_fast into it
# (editable). The CUDA extension is built when torch is a CUDA build and nvcc is found, for
# TORCH_CUDA_ARCH_LIST (default 9.0 here); MAE_FAST_BUILD_CUDA=1 makes a failed build an error.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -r requirements-dev.txt
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
.venv/bin/pip install -q --no-build-isolation --no-deps -e .
