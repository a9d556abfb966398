#!/usr/bin/env bash
# Sets up .venv (building the CUDA extension for sm_90, which must succeed), checks a regular install of a
# wheel outside the checkout (scripts/check_install.sh: the wheel builds the extension once more, the bulk
# of its few minutes) and runs the whole test suite. Extra arguments go to pytest. pytest's "no tests
# collected" (exit 5) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAE_FAST_BUILD_CUDA=1 bash scripts/setup_env.sh || {
  echo "setup failed"
  exit 1
}
.venv/bin/ruff check . || exit 1
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAE_FAST_BUILD_CUDA=1 bash scripts/check_install.sh || {
  echo "the regular-install check failed (scripts/check_install.sh)"
  exit 1
}
.venv/bin/pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing"
  exit 1
fi
exit "$status"
