#!/usr/bin/env bash
# One call on a machine with one NVIDIA GPU (no network): build mae_fast._C in place for that GPU, run the
# gpu-marked tests (every backend against the reference, compute-sanitizer cases) and the rest of the suite,
# run the benchmarks, the input-pipeline stages (benchmarks.bench_data --device cuda) and the fine-tuning step
# against timm (benchmarks.finetune_step) within a time budget, and leave at most 8 files, flat, in OUTDIR:
#   gpu_check.log, <device>_<date>.json, <device>_<date>_{kernels,train,sweep}.png, <device>_<date>_summary.txt,
#   input_pipeline_<cuda|cpu>_<date>.json (the fine-tuning step's table and JSON line are in gpu_check.log)
# A short summary table is printed last. Each stage has its own timeout; a failing stage is reported and the
# next ones still run (benchmarks of whatever works). Total wall time stays under MAE_FAST_GPU_CHECK_BUDGET_S
# (default 540 s = 9 min); the tests never take the last 300 s, which belong to the benchmarks and the report.
#
# usage: benchmarks/gpu_check.sh [--dry-run] OUTDIR      (or MAE_FAST_GPU_CHECK_DRY=1)
#   --dry-run: for a machine without a GPU. Checks that the script finds its pieces and its Python, reports the
#   GPU stages as skipped, and writes the same kinds of files from a small CPU smoke benchmark.
# env: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda), MAE_FAST_GPU_CHECK_BUDGET_S,
#   MAE_FAST_GIT_COMMIT (recorded in the results when the copy has no .git).
set -uo pipefail

DRY="${MAE_FAST_GPU_CHECK_DRY:-0}"
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
fi
if [ $# -ne 1 ]; then
  echo "usage: $0 [--dry-run] OUTDIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET_S="${MAE_FAST_GPU_CHECK_BUDGET_S:-540}"
# the tests never eat into the last 300 s: benchmarks (>= 140 s), the data stages (45 s), the fine-tuning step
# eager (25 s) and with torch.compile of timm (50 s: its compilation takes most of it), the report (40 s)
BENCH_RESERVE_S=300
DATA_S=45
FINETUNE_S=25
FINETUNE_COMPILED_S=50
START_S=$(date +%s)
STAGES=()
FAILED=0
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$PATH:$CUDA_HOME/bin" # nvcc and compute-sanitizer for the build and the sanitizer tests
: >"$LOG"

say() { echo "[gpu_check $(($(date +%s) - START_S))s] $*" | tee -a "$LOG"; }
left_s() { echo $((BUDGET_S - ($(date +%s) - START_S))); }
# cap MAX RESERVE: a stage timeout of at most MAX seconds that keeps RESERVE seconds of the budget for later
cap() {
  local limit=$(($(left_s) - $2))
  echo $((limit < $1 ? limit : $1))
}
record() { STAGES+=("$(printf '%-12s %-34s %5ss' "$1" "$2" "$3")"); }

# stage NAME TIMEOUT_S CMD...: runs CMD with its own timeout, output to the log; never aborts the script.
stage() {
  local name=$1 limit=$2 begin rc status
  shift 2
  if [ "$limit" -le 10 ]; then
    say "== $name: skipped, time budget spent"
    record "$name" "skipped (time budget spent)" 0
    return 1
  fi
  say "== $name (timeout ${limit}s): $*"
  begin=$(date +%s)
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMED OUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  [ $rc -eq 0 ] || FAILED=1
  say "== $name: $status"
  record "$name" "$status" $(($(date +%s) - begin))
  return $rc
}

skip() {
  say "== $1: SKIPPED ($2)"
  record "$1" "skipped ($2)" 0
}

# --- preflight: the pieces and the toolchain ---------------------------------------------------------------
missing=""
for piece in setup.py csrc kernels/__init__.py mae_fast/__init__.py tests/conftest.py \
  benchmarks/run.py benchmarks/summary.py benchmarks/plot.py benchmarks/bench_data.py benchmarks/finetune_step.py; do
  [ -e "$ROOT/$piece" ] || missing="$missing $piece"
done
if [ -n "$missing" ] || [ -z "$PY" ]; then
  say "preflight: missing:${missing:- } ${PY:-no python3/python found}"
  record preflight "FAILED (missing pieces)" 0
  printf '%s\n' "${STAGES[@]}"
  exit 1
fi
say "repo $ROOT, python $PY, out $OUT, budget ${BUDGET_S}s, dry=$DRY"
stage preflight 60 "$PY" -c "
import sys, torch, triton
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible')
"
if [ "$DRY" != 1 ]; then
  { nvidia-smi -L; "$CUDA_HOME/bin/nvcc" --version | tail -2; command -v compute-sanitizer || echo "no compute-sanitizer on PATH"; } >>"$LOG" 2>&1
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>>"$LOG")
  DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
else
  ARCH="" DEVICE="dry-run"
fi
STEM="$(echo "${DEVICE:-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')_$(date -u +%Y-%m-%d)"

# --- build the extension in place for this GPU --------------------------------------------------------------
# An editable install (offline: --no-index, no deps, no build isolation) builds mae_fast/_C*.so in place and
# maps mae_fast.kernels to kernels/. If pip cannot do it, build_ext --inplace plus a mae_fast/kernels link
# gives the same imports from PYTHONPATH=. alone.
build() {
  export TORCH_CUDA_ARCH_LIST="$ARCH" MAE_FAST_BUILD_CUDA=1
  if ! "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$ROOT"; then
    echo "pip editable install failed; building in place with setup.py"
    "$PY" setup.py build_ext --inplace || return 1
    [ -e mae_fast/kernels ] || ln -s ../kernels mae_fast/kernels
  fi
  "$PY" -c "
import mae_fast, mae_fast.kernels
from mae_fast import _extension
print('mae_fast from', mae_fast.__file__, '| kernels from', mae_fast.kernels.__file__)
print('extension:', 'loaded' if _extension.available() else _extension.unavailable_reason())
assert _extension.available(), 'the CUDA extension did not load'
"
}
if [ "$DRY" = 1 ]; then
  skip build "dry run"
  skip tests-gpu "dry run"
  skip tests-suite "dry run"
else
  export -f build
  export PY ROOT ARCH
  stage build "$(cap 180 0)" bash -c build
  # gpu-marked tests first: every backend against the reference on the GPU, compute-sanitizer cases
  stage tests-gpu "$(cap 120 "$BENCH_RESERVE_S")" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
  # the rest of the suite on the GPU (kernel tests use CUDA tensors here); left to CI: the CPU smoke tests of
  # the benchmarks (the benchmark stage below runs the real thing) and the CPU emulation of the CUDA kernels
  # (marker cuda_emulation, tests/ops/: its build would eat this stage; the kernels ran for real above)
  stage tests-suite "$(cap 90 "$BENCH_RESERVE_S")" \
    "$PY" -m pytest -q -m "not gpu and not slow and not cuda_emulation" -p no:cacheprovider --benchmark-disable \
    --ignore=tests/test_bench.py --ignore=tests/test_bench_perf.py tests
fi

# --- benchmarks: what works, within the time left; the JSON is rewritten after every case --------------------
if [ "$DRY" = 1 ]; then
  say "benchmarks: GPU run skipped (dry run); a CPU smoke subset writes the files instead"
  stage bench-smoke 120 "$PY" -m benchmarks.run --smoke --out "$OUT" --name "$STEM" --no-plots \
    --sections kernels --ops random_masking
  # the same code as the GPU stages below, on the CPU at toy sizes (their numbers claim nothing)
  stage data-stages "$DATA_S" "$PY" -m benchmarks.bench_data --device cpu --model tiny --workers 2 --batch 4 \
    --loader-batches 4 --steps 2 --out "$OUT"
  stage finetune "$((FINETUNE_S + FINETUNE_COMPILED_S))" "$PY" -m benchmarks.finetune_step --size demo --batch 8 \
    --steps 1 --threads 2
else
  # leaves the later stages and the report their time
  BENCH_LIMIT=$(($(left_s) - 45 - DATA_S - FINETUNE_S - FINETUNE_COMPILED_S))
  stage benchmarks "$BENCH_LIMIT" "$PY" -m benchmarks.run --out "$OUT" --name "$STEM" --no-plots \
    --budget-s $((BENCH_LIMIT > 60 ? BENCH_LIMIT - 45 : 15)) --rep-ms 50
  # the input pipeline on the GPU: loader alone at 16 workers, decode and augment per batch, ViT-B MAE step on
  # real JPEGs against synthetic batches
  stage data-stages "$(cap "$DATA_S" $((45 + FINETUNE_S + FINETUNE_COMPILED_S)))" "$PY" -m benchmarks.bench_data \
    --device cuda --workers 16 --batch 256 --loader-batches 24 --steps 12 --out "$OUT"
  # the fine-tuning step, ViT-B 224 px (197 tokens), drop path 0.1: mae_fast against timm (SDPA), then the same
  # side by side with torch.compile of timm (a separate stage, so that a slow compile cannot lose the eager rows)
  stage finetune "$(cap "$FINETUNE_S" $((45 + FINETUNE_COMPILED_S)))" "$PY" -m benchmarks.finetune_step \
    --size vit_b --batch 64 --steps 5
  stage ft-compiled "$(cap "$FINETUNE_COMPILED_S" 45)" "$PY" -m benchmarks.finetune_step --size vit_b --batch 64 \
    --steps 3 --compile timm
fi
rm -f "$OUT/$STEM.tmp"
if [ -f "$OUT/$STEM.json" ]; then
  stage report 40 "$PY" -m benchmarks.summary "$OUT/$STEM.json" --out "$OUT" --plots
else
  skip report "no results JSON"
fi

# --- the summary table, last ---------------------------------------------------------------------------------
{
  echo
  echo "gpu_check: $(($(date +%s) - START_S))s, device ${DEVICE:-?}, files in $OUT:"
  (cd "$OUT" && ls -1)
  printf '%s\n' "${STAGES[@]}"
  [ -f "$OUT/${STEM}_summary.txt" ] && cat "$OUT/${STEM}_summary.txt"
} | tee -a "$LOG"
exit $FAILED
