"""Build csrc/ as a CPU extension that runs the CUDA kernels under the emulation in runtime.h.

The sources are rewritten into plain C++ (the CUDA sources themselves are not changed):
- ``kernel<<<grid, block, shared, stream>>>(args)`` becomes ``launch(kernel, config(grid, block, shared,
  stream), args)``;
- ``extern __shared__ T name[];`` becomes a pointer to the block's dynamic shared memory;
- the CUDA host calls (device guard, current stream, launch checks, device and function attributes) become
  the stand-ins of runtime.h, and the checks that inputs are CUDA tensors accept CPU tensors instead;
- the kernels implement the primitives of ``torch.ops.mae_fast_emu.*`` for CPU tensors (``torch.ops.mae_fast``
  is the real extension's namespace); the schemas are defined in Python first, as for the real extension
  (``mae_fast.backends.cuda._library.install``).
The result is compiled with the host compiler through torch.utils.cpp_extension (no nvcc, no GPU).
"""

from __future__ import annotations

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
NAMESPACE = "mae_fast_emu"

_HOST_CALLS = [
    (r"c10::cuda::CUDAGuard\b", "::mae_fast_emu::DeviceGuard"),
    (r"c10::cuda::getCurrentCUDAStream\(\)", "::mae_fast_emu::Stream()"),
    (r"C10_CUDA_KERNEL_LAUNCH_CHECK\(\)", "::mae_fast_emu::launch_check()"),
    (r"C10_CUDA_CHECK\(", "::mae_fast_emu::check("),
    (r"\bcudaDeviceGetAttribute\b", "::mae_fast_emu::device_get_attribute"),
    (r"\bcudaFuncSetAttribute\b", "::mae_fast_emu::func_set_attribute"),
    (r"\.is_cuda\(\)", ".is_cpu()"),
    (r"#include <mma.h>\n", ""),
    (r"TORCH_LIBRARY_IMPL\(mae_fast, CUDA,", f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU,"),
]
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\[\];")


def _matching(text: str, start: int, opening: str, closing: str) -> int:
    """Index just past the bracket that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {opening}{closing} from offset {start}")


def _kernel_expression_start(text: str, end: int) -> int:
    """Start of the kernel expression (a name with optional template arguments) that ends at ``end``."""
    i = end
    while text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":  # template arguments: walk back to the matching '<'
        depth = 0
        while True:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_launches(text: str) -> str:
    """``kernel<...><<<config>>>(args)`` -> ``::mae_fast_emu::launch(kernel<...>, config(config), args)``."""
    while (start := text.find("<<<")) != -1:
        kernel_start = _kernel_expression_start(text, start)
        kernel = text[kernel_start:start].strip()
        config_end = text.index(">>>", start)
        config = text[start + 3 : config_end]
        args_start = text.index("(", config_end)
        args_end = _matching(text, args_start, "(", ")")
        args = text[args_start + 1 : args_end - 1].strip()
        call = f"::mae_fast_emu::launch({kernel}, ::mae_fast_emu::config({config})" + (f", {args})" if args else ")")
        text = text[:kernel_start] + call + text[args_end:]
    return text


def rewrite(text: str) -> str:
    """One csrc/ file as plain C++ for the emulation."""
    for pattern, replacement in _HOST_CALLS:
        text = re.sub(pattern, replacement, text)
    text = _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::mae_fast_emu::dynamic_shared());", text)
    return rewrite_launches(text)


def write_sources(folder: str) -> list[str]:
    """Rewrite every csrc/ file, and the emulation's own selftest.cu, into ``folder`` (only files whose text
    changed are rewritten, so rebuilds stay incremental); returns the C++ sources to compile."""
    os.makedirs(folder, exist_ok=True)
    sources = []
    paths = [os.path.join(CSRC, name) for name in sorted(os.listdir(CSRC))] + [os.path.join(HERE, "selftest.cu")]
    for path in paths:
        name = os.path.basename(path)
        stem, ext = os.path.splitext(name)
        if ext not in (".cu", ".cpp", ".h"):
            continue
        with open(path) as handle:
            text = rewrite(handle.read())
        target = os.path.join(folder, name if ext == ".h" else f"{stem}.cpp")
        if not os.path.exists(target) or open(target).read() != text:
            with open(target, "w") as handle:
                handle.write(text)
        if ext != ".h":
            sources.append(target)
    return sources


def cuda_include_dir() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return os.path.join(home, "include")


#: A build lock older than this was left by a build that was killed (a build takes a few minutes here).
STALE_LOCK_S = 20 * 60


def default_build_dir() -> str:
    """build/cuda_emulation/<torch version>-py<major.minor>: one build per environment, so that venvs with other
    torch or Python versions sharing this checkout never load each other's binary."""
    import sys

    import torch

    tag = f"{torch.__version__.replace('+', '-')}-py{sys.version_info.major}.{sys.version_info.minor}"
    return os.path.join(ROOT, "build", "cuda_emulation", tag)


def _remove_stale_lock(build_dir: str) -> None:
    """torch's build lock waits forever for a lock file a killed build left behind: remove such a file."""
    import time
    import warnings

    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
        warnings.warn(f"removing the stale build lock {lock} (left by a killed build)", stacklevel=2)
        os.remove(lock)


def build(build_dir: str | None = None, verbose: bool = False):
    """Compile the emulated extension into ``build_dir`` (default :func:`default_build_dir`; incremental) and
    import it; its ops are then ``torch.ops.mae_fast_emu.*`` on CPU tensors (and the self-tests
    ``torch.ops.mae_fast_emu_selftest.run``)."""
    from torch.utils import cpp_extension

    build_dir = build_dir or default_build_dir()
    os.makedirs(build_dir, exist_ok=True)
    _remove_stale_lock(build_dir)
    source_dir = os.path.join(build_dir, "src")
    sources = write_sources(source_dir)
    return cpp_extension.load(
        name="mae_fast_emu_C",
        sources=sources,
        extra_cflags=["-O1", "-include", os.path.join(HERE, "runtime.h"), "-w"],
        extra_include_paths=[source_dir, cuda_include_dir()],
        build_directory=build_dir,
        with_cuda=False,
        verbose=verbose,
    )
