#!/usr/bin/env bash
# Builds .venv-gpu-stack/ with the versions of the lent GPU machine (Python 3.12, torch 2.11.0 built for
# CUDA 13.0, triton 3.6.0, torchvision 0.26.0, numpy < 2.4 for the triton 3.6 interpreter) plus the rest
# of requirements-dev.txt, installs mae_fast into it (editable) and runs the CPU test suite there; extra
# arguments go to pytest. It downloads a few GB, so CI does not run it. The CUDA extension is built for
# sm_90 when nvcc's CUDA release is torch's; else it is skipped, with the reason printed.
#   PYTHON=...            the interpreter for the venv (default: a Python 3.12, as on the GPU machine)
#   GPU_STACK_REINSTALL=1 reinstall the packages even if the venv already has this set of pins
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-gpu-stack
PINS=("torch==2.11.0" "torchvision==0.26.0" "triton==3.6.0" "numpy<2.4")

find_python() {
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
    return
  fi
  if python3.12 --version >/dev/null 2>&1; then
    command -v python3.12
    return
  fi
  local candidate
  for candidate in "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12; do
    if [ -x "$candidate" ]; then
      echo "$candidate"
      return
    fi
  done
  echo "gpu_stack_env: no Python 3.12 found; set PYTHON to one" >&2
  exit 1
}

# .venv's interpreter must differ in version: the editable installs put the CUDA extension into
# mae_fast/ under a name tagged with the Python version, and the same tag would overwrite .venv's.
python="$(find_python)"
tag="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [ -x .venv/bin/python ]; then
  main_tag="$(.venv/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  if [ "$tag" = "$main_tag" ]; then
    echo "gpu_stack_env: $python is Python $tag like .venv's; its CUDA extension would replace .venv's" >&2
    exit 1
  fi
fi

[ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
requirements="$VENV/requirements.txt"
{
  grep -vE '^(torch|torchvision|triton|numpy)([=<>!~ ]|$)' requirements-dev.txt
  printf '%s\n' "${PINS[@]}"
} >"$requirements.new"
if [ "${GPU_STACK_REINSTALL:-0}" = 1 ] || ! cmp -s "$requirements.new" "$requirements"; then
  "$VENV/bin/pip" install -q -r "$requirements.new"
  mv "$requirements.new" "$requirements"
else
  rm "$requirements.new"
fi

"$VENV/bin/python" - <<'EOF'
import numpy
import torch
import triton

print(f"gpu_stack_env: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"numpy {numpy.__version__}")
if torch.version.cuda != "13.0":
    raise SystemExit(f"gpu_stack_env: torch {torch.__version__} is built for CUDA {torch.version.cuda}, not 13.0")
EOF

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
nvcc_release="$("$CUDA_HOME/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\),.*/\1/p' || true)"
if [ "$nvcc_release" = "13.0" ]; then
  export TORCH_CUDA_ARCH_LIST=9.0 MAE_FAST_BUILD_CUDA=1
else
  echo "gpu_stack_env: nvcc ${nvcc_release:-not found} is not CUDA 13.0: skipping the CUDA extension" >&2
  export MAE_FAST_BUILD_CUDA=0
fi
# The build rewrites build/ptxas_report.txt, which .venv's tests read: keep .venv's copy.
report=build/ptxas_report.txt
saved_report=""
if [ -f "$report" ]; then
  saved_report="$(mktemp)"
  cp "$report" "$saved_report"
fi
status=0
"$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . || status=$?
if [ -n "$saved_report" ]; then
  cp "$saved_report" "$report"
  rm "$saved_report"
fi
[ "$status" -eq 0 ] || exit "$status"

"$VENV/bin/pytest" -p no:cacheprovider "$@" && status=0 || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing"
  exit 1
fi
exit "$status"
