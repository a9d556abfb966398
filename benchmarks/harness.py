"""Measuring machinery shared by the benchmarks: timers, ceilings, correctness gates, the environment.

GPU timings come from ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call, median
and p20/p80); a call that needs fresh state each time (a backward that consumes its graph) is timed with
CUDA events around that call alone, its set-up untimed, L2 flushed the same way. CPU timings
(``--smoke``) come from ``time.perf_counter`` and are labelled as such: they keep the suite working
without a GPU and are never performance claims.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

L2_BYTES = 60 * 1024**2  # H200 L2 is 60 MB (50 MB on H100): inputs rotate over more than twice that
ROTATION_BYTES = 2 * L2_BYTES
L2_FLUSH_BYTES = 256 * 1024**2  # what do_bench zeroes before each call to empty the L2
MAX_ROTATION = 32
REPO_ROOT = Path(__file__).resolve().parent.parent

# Floor of the correctness gate, relative to the largest reference value, per dtype of the compared
# tensor: TF32 dots for fp32, ~4 ulp at that magnitude for fp16 / bf16. The eager reference upcasts to
# fp32 inside, so its own error is only the final rounding, while a correct kernel keeping bf16
# operands (flash attention's P and dS) accumulates a few ulp more. The gate exists to keep wrong
# kernels (indexing, masking, scaling: errors of the order of the values) out of the timings; the
# kernel tests hold each op to its precise tolerances.
TOLERANCE_FLOOR = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str


class Budget:
    """A wall-clock budget in seconds (None: unlimited) shared by every section of a run."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds


def restores_torch_threads(main: Callable[..., int]) -> Callable[..., int]:
    """A benchmark's ``main`` that may set torch's CPU thread count, made to put the caller's count back on
    return (``mae-fast bench`` and the tests call these mains in their own process)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        threads = torch.get_num_threads()
        try:
            return main(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def balanced_rounds(names: list[str], rounds: int) -> list[list[str]]:
    """``rounds`` orders of ``names`` from a balanced Latin square (Williams' design), repeated as needed.

    Over one cycle (len(names) rounds, twice that for an odd count) every provider runs equally often in
    every position and right after every other provider equally often, so neither a fixed position nor a
    fixed predecessor favours anyone."""
    n = len(names)
    if n == 0:
        return [[] for _ in range(rounds)]
    first, low, high = [0], 1, n - 1
    for j in range(1, n):
        if j % 2:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    cycle = [[(k + i) % n for k in first] for i in range(n)]
    if n % 2:
        cycle += [row[::-1] for row in cycle]
    return [[names[k] for k in cycle[r % len(cycle)]] for r in range(rounds)]


def error_message(error: Exception) -> str:
    """First line of an exception, with its type, for a row's reason."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    device: torch.device,
    grad_to_none: Sequence[torch.Tensor] = (),
    smoke: bool = False,
    rep_ms: int = 100,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """Median and p20/p80 of ``fn`` in ms, with the gradients of ``grad_to_none`` reset and ``setup()`` run
    (when given: a forward before a backward that frees its graph) untimed before every call. On CUDA:
    do_bench with ``rep_ms`` of timed calls, or, with a set-up, CUDA events around each call after an L2
    flush; on the CPU a perf_counter loop (in smoke mode the correctness check's call is the only warm-up)."""

    def prepare():
        _reset_grads(grad_to_none)
        if setup is not None:
            setup()

    if device.type != "cuda":
        return _cpu_timing(prepare, fn, smoke)
    if setup is not None:
        return _cuda_event_timing(prepare, fn, device, rep_ms)
    from triton.testing import do_bench

    warmup, rep = max(5, rep_ms // 4), rep_ms
    median, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none), quantiles=[0.5, 0.2, 0.8])
    return Timing(float(median), float(p20), float(p80), "triton.testing.do_bench (CUDA events, L2 flushed)")


def _reset_grads(tensors: Sequence[torch.Tensor]) -> None:
    for tensor in tensors:
        tensor.grad = None


def _timing(samples_ms: Sequence[float], timer: str) -> Timing:
    q = torch.tensor(samples_ms, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(float(q[0]), float(q[1]), float(q[2]), timer)


def _cpu_timing(prepare: Callable[[], object], fn: Callable[[], object], smoke: bool) -> Timing:
    """perf_counter around ``fn`` with ``prepare()`` untimed before each call (in smoke mode the correctness
    check's call is the only warm-up)."""
    if not smoke:
        prepare()
        fn()
    samples = []
    for _ in range(2 if smoke else 10):
        prepare()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return _timing(samples, "time.perf_counter on the CPU (not a GPU claim)")


def _cuda_event_timing(
    prepare: Callable[[], object], fn: Callable[[], object], device: torch.device, rep_ms: int
) -> Timing:
    """CUDA events around each call of ``fn``, after ``prepare()`` and an L2 flush (both untimed)."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def timed_call():
        prepare()
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end

    for _ in range(3):
        timed_call()
    start, end = timed_call()
    torch.cuda.synchronize(device)
    reps = int(min(1000, max(10, rep_ms / max(start.elapsed_time(end), 1e-3))))
    events = [timed_call() for _ in range(reps)]
    torch.cuda.synchronize(device)
    return _timing(
        [start.elapsed_time(end) for start, end in events], "CUDA events around each call (set-up untimed, L2 flushed)"
    )


def rotation_count(bytes_per_set: int, device: torch.device) -> int:
    """How many input copies to cycle through so that together they exceed twice the GPU's L2 cache."""
    if device.type != "cuda":
        return 1
    return max(1, min(MAX_ROTATION, math.ceil(ROTATION_BYTES / max(1, bytes_per_set))))


# --- ceilings --------------------------------------------------------------------------------------


def measure_ceilings(device: torch.device, smoke: bool, rep_ms: int = 100) -> dict:
    """Device-to-device copy bandwidth and dense matmul throughput, measured in this run."""
    if smoke or device.type != "cuda":
        copy_elems, n, dtype = 1024**2, 256, torch.float32
    else:
        copy_elems, n, dtype = 512 * 1024**2, 8192, torch.bfloat16
    src = torch.rand(copy_elems, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device, smoke=smoke, rep_ms=rep_ms)
    copy_bytes = 2 * src.numel() * src.element_size()
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul = measure(lambda: torch.mm(a, b), device, smoke=smoke, rep_ms=rep_ms)
    flops = 2 * n**3
    return {
        "copy": {
            "bytes": copy_bytes,
            "median_ms": copy.median_ms,
            "p20_ms": copy.p20_ms,
            "p80_ms": copy.p80_ms,
            "gbps": copy_bytes / copy.median_ms / 1e6,
        },
        "matmul": {
            "shape": [n, n, n],
            "dtype": str(dtype).removeprefix("torch."),
            "median_ms": matmul.median_ms,
            "p20_ms": matmul.p20_ms,
            "p80_ms": matmul.p80_ms,
            "tflops": flops / matmul.median_ms / 1e9,
        },
    }


# --- correctness gate ------------------------------------------------------------------------------


def flatten(value) -> list[torch.Tensor | None]:
    """Tensors of a (possibly nested) tuple/list, in order."""
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flatten(item)]
    return [value]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    max_abs_err: float
    tolerance: float
    detail: str


def compare(actual, exact, eager) -> Verdict:
    """Gate a provider's outputs against an exact (fp64) reference, flash-attention style.

    Each floating tensor of ``actual`` may differ from ``exact`` by at most twice the error of the eager
    reference at the same precision (``eager``) plus a floor of ~4 ulp of its dtype times the largest
    reference value. Integer tensors must be equal.
    """
    actual, exact, eager = flatten(actual), flatten(exact), flatten(eager)
    if not len(actual) == len(exact) == len(eager):
        return Verdict(False, math.inf, 0.0, f"{len(actual)} outputs, expected {len(exact)}")
    worst_err, worst_tol = 0.0, 0.0
    for index, (a, e, r) in enumerate(zip(actual, exact, eager, strict=True)):
        if a is None and e is None:
            continue
        if a is None or e is None:
            return Verdict(False, math.inf, 0.0, f"output {index}: a gradient is missing")
        if tuple(a.shape) != tuple(e.shape):
            return Verdict(False, math.inf, 0.0, f"output {index}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
        if not e.is_floating_point():
            if not torch.equal(a.cpu().long(), e.cpu().long()):
                return Verdict(False, math.inf, 0.0, f"output {index}: integer values differ")
            continue
        if not torch.isfinite(a).all():
            return Verdict(False, math.inf, 0.0, f"output {index}: non-finite values")
        a64, e64, r64 = a.double(), e.double(), r.double()
        err = float((a64 - e64).abs().max()) if a.numel() else 0.0
        eager_err = float((r64 - e64).abs().max()) if a.numel() else 0.0
        scale = float(e64.abs().max()) if a.numel() else 0.0
        tol = 2 * eager_err + TOLERANCE_FLOOR.get(a.dtype, 1e-3) * max(scale, 1e-6)
        if err > tol:
            return Verdict(False, err, tol, f"output {index} ({a.dtype}): max |err| {err:.3e} > tolerance {tol:.3e}")
        if err / tol >= worst_err / max(worst_tol, 1e-30):
            worst_err, worst_tol = err, tol
    return Verdict(True, worst_err, worst_tol, "")


# --- environment -----------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _optional_version(module: str) -> str | None:
    try:
        imported = __import__(module)
    except Exception as error:  # optional peers may fail to import in many ways (bad builds, CUDA mismatch)
        return f"not importable ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return getattr(imported, "__version__", "importable")


def _extension_state() -> str:
    from mae_fast import _extension

    try:
        return "loaded" if _extension.available() else str(_extension.unavailable_reason())
    except Exception as error:  # a stale or half-built extension must not stop the benchmarks
        return f"failed to load ({type(error).__name__}: {error})"


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform's processor or machine."""
    from mae_fast import cpu_gemm

    return cpu_gemm.cpu_fields().get("model name") or platform.processor() or platform.machine()


def environment(device: torch.device, smoke: bool) -> dict:
    """GPU, versions, commit and date of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("MAE_FAST_GIT_COMMIT") or _git("rev-parse", "HEAD")  # a copy without .git sets it
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": gpu or f"cpu ({_cpu_model()}, {platform.machine()}, {os.cpu_count()} cores)",
        "gpu": gpu,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if gpu else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "extension": _extension_state(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "xformers": _optional_version("xformers"),
        "apex": _optional_version("apex"),
        "smoke": smoke,
        "claims": device.type == "cuda" and not smoke,
    }


def device_slug(env: dict) -> str:
    """A file-name friendly device name: 'nvidia-h200' or 'cpu'."""
    name = env["gpu"] or "cpu"
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-").replace("--", "-")
