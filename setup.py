"""Build of mae_fast: the Python package, its Triton kernels and the optional CUDA extension mae_fast._C.

The extension is built when the installed torch is a CUDA build, nvcc is found and an architecture is
known (TORCH_CUDA_ARCH_LIST, else the visible GPU). MAE_FAST_BUILD_CUDA=0 skips it; =1 forces it and
fails loudly when it cannot be built. Install with ``pip install --no-build-isolation .`` so the build
sees the installed torch. The compiler's register/spill report of every kernel (nvcc -Xptxas=-v) is kept
in build/ptxas_report.txt next to this file, where tests/test_cuda_extension.py reads it.
"""

import glob
import os
import shutil
import sys
import tempfile

from setuptools import setup

PACKAGES = ["mae_fast", "mae_fast.kernels"]
PACKAGES += [  # every package below mae_fast/, at any depth (mae_fast/backends/<backend>/ included)
    "mae_fast." + os.path.relpath(path, "mae_fast").replace(os.sep, ".").rstrip(".")
    for path in sorted(glob.glob("mae_fast/**/", recursive=True))
    if path != "mae_fast/" and os.path.isfile(os.path.join(path, "__init__.py"))
]
PACKAGE_DIR = {"mae_fast": "mae_fast", "mae_fast.kernels": "kernels"}
BYTES_PER_NVCC_JOB = 3 * 1024**3
PTXAS_REPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "ptxas_report.txt")


def _say(message: str) -> None:
    print(f"mae_fast setup: {message}", file=sys.stderr)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


def _default_max_jobs() -> str:
    by_memory = max(1, _available_memory() // BYTES_PER_NVCC_JOB)
    return str(max(1, min(os.cpu_count() or 1, by_memory)))


def _keep_ptxas_report(build_log: str) -> None:
    """Write the ptxas lines of a build log to PTXAS_REPORT (a no-op rebuild compiles nothing: keep the old one)."""
    lines = [line.strip() for line in build_log.splitlines() if "ptxas info" in line or "bytes stack frame" in line]
    if not lines:
        return
    os.makedirs(os.path.dirname(PTXAS_REPORT), exist_ok=True)
    with open(PTXAS_REPORT, "w") as report:
        report.write("\n".join(lines) + "\n")
    _say(f"register/spill report of {sum('Compiling entry' in line for line in lines)} kernels in {PTXAS_REPORT}")


def _build_ext_keeping_ptxas_report(base):
    """BuildExtension that tees the compiler output (ninja writes to fd 1) to keep the ptxas report."""

    class BuildExtensionWithReport(base):
        def build_extensions(self):
            with tempfile.TemporaryFile() as log:
                sys.stdout.flush()
                saved = os.dup(1)
                os.dup2(log.fileno(), 1)
                try:
                    super().build_extensions()
                finally:
                    sys.stdout.flush()
                    os.dup2(saved, 1)
                    os.close(saved)
                    log.seek(0)
                    text = log.read().decode(errors="replace")
                    sys.stdout.write(text)
                    sys.stdout.flush()
            _keep_ptxas_report(text)

    return BuildExtensionWithReport


def _cuda_extension_plan():
    """(ext_modules, cmdclass) for mae_fast._C, or ([], {}) with the reason printed."""
    mode = os.environ.get("MAE_FAST_BUILD_CUDA", "auto")
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"MAE_FAST_BUILD_CUDA must be 0, 1 or unset, got {mode!r}")
    forced = mode == "1"

    def skip(reason: str):
        if forced:
            raise SystemExit(f"mae_fast setup: MAE_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"skipping the CUDA extension: {reason}")
        return [], {}

    if mode == "0":
        return skip("MAE_FAST_BUILD_CUDA=0")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return skip(
            "torch is not importable at build time (install torch first, then pip install --no-build-isolation .)"
        )
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME")
    if cuda_home is None or shutil.which("nvcc", path=os.path.join(cuda_home, "bin")) is None:
        return skip("nvcc was not found (set CUDA_HOME)")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        return skip(
            "no GPU is visible and TORCH_CUDA_ARCH_LIST is unset; "
            "to build anyway: TORCH_CUDA_ARCH_LIST=9.0 MAE_FAST_BUILD_CUDA=1 pip install --no-build-isolation ."
        )
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    include_dirs = [os.path.abspath("csrc")]
    for root in sys.path:
        candidate = os.path.join(root, "nvidia", "cu13", "include")
        if os.path.isdir(candidate):
            include_dirs.append(candidate)
            break
    extension = cpp_extension.CUDAExtension(
        name="mae_fast._C",
        sources=sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu")),
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v", "--expt-relaxed-constexpr"],
        },
    )
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPU")
    _say(f"building mae_fast._C for {arch} with MAX_JOBS={os.environ['MAX_JOBS']}")
    build_ext = _build_ext_keeping_ptxas_report(cpp_extension.BuildExtension.with_options(use_ninja=True))
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = _cuda_extension_plan()

setup(
    packages=sorted(set(PACKAGES)),
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
