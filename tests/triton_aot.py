"""Ahead-of-time compilation of Triton kernels for real GPU targets, without a GPU.

``compile_report`` runs Triton's full pipeline to PTX and cubin for an sm_XX target (this catches
errors the interpreter accepts), then asks ptxas for the register and spill counts of the PTX; the
shared memory the kernel needs comes from Triton's metadata. A kernel that needs more shared memory than
one block of that architecture can have compiles fine but fails at launch ("out of resource"), so
``compile_reports`` refuses it.
``compile_reports`` runs a batch of such builds in fresh processes (one unless told more) without
TRITON_INTERPRET: under the interpreter (as in the test process) @triton.jit gives functions Triton's
compiler cannot take.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget

#: The most shared memory one block can use (the opt-in maximum, bytes), per compute capability.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class KernelReport:
    name: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    ptx: str

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def uses_tensor_cores(self) -> bool:
        return "wgmma" in self.ptx or "mma.sync" in self.ptx

    def __str__(self) -> str:
        cores = "tensor cores" if self.uses_tensor_cores else "no tensor-core instruction"
        return (
            f"{self.name} sm_{self.arch}: {self.registers} registers, "
            f"{self.spill_stores} B spill stores, {self.spill_loads} B spill loads, "
            f"{self.shared_bytes} B shared memory, {cores}"
        )


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia import compiler

    try:
        tool = compiler.get_ptxas(arch)  # triton >= 3.5 picks a ptxas per architecture
    except TypeError:
        tool = compiler.get_ptxas()
    return tool.path


def compile_report(
    fn, signature: dict, constexprs: dict, arch: int = 90, num_warps: int = 4, num_stages: int = 3
) -> KernelReport:
    """Compile ``fn`` (a @triton.jit function) for sm_``arch`` and report its resources."""
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = kernel.asm["ptx"]
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            [_ptxas(arch), "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", os.path.join(folder, "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    shared = int(kernel.metadata.shared)
    return KernelReport(kernel.name, arch, registers, int(spills.group(1)), int(spills.group(2)), shared, ptx)


def _build_in_subprocess(jobs: list[dict]) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def compile_reports(jobs: list[dict], processes: int = 1) -> list[dict]:
    """Build every job in ``processes`` subprocesses (jobs dealt out in turn); each result, in the order of
    ``jobs``, is the job plus text, registers, spills, shared_bytes and tensor_cores. Fails when a kernel
    needs more shared memory than a block of its target can have.

    A job names ``module`` and ``kernel``, gives ``signature`` (the types of the non-constexpr arguments),
    ``constexprs``, ``arch`` and optionally ``num_warps`` (4), ``num_stages`` (3) and a ``label``.
    """
    processes = max(1, min(processes, len(jobs)))
    shares = [jobs[first::processes] for first in range(processes)]
    with ThreadPoolExecutor(processes) as pool:
        outputs = list(pool.map(_build_in_subprocess, shares))
    reports = [None] * len(jobs)
    for first, share_reports in enumerate(outputs):
        assert len(share_reports) == len(shares[first])
        reports[first::processes] = share_reports
    too_big = [
        f"{r['text']} (one sm_{r['arch']} block can have {MAX_SHARED_BYTES[r['arch']]} B)"
        for r in reports
        if r["shared_bytes"] > MAX_SHARED_BYTES[r["arch"]]
    ]
    assert not too_big, too_big
    return reports


def _build_jobs_from_stdin() -> None:
    reports = []
    for job in json.loads(sys.stdin.read()):
        kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
        types = {**job["signature"], **dict.fromkeys(job["constexprs"], "constexpr")}
        signature = {name: types[name] for name in kernel.arg_names}
        report = compile_report(
            kernel, signature, job["constexprs"], job["arch"], job.get("num_warps", 4), job.get("num_stages", 3)
        )
        reports.append(
            {
                **job,
                "text": str(report),
                "registers": report.registers,
                "spills": report.spills,
                "shared_bytes": report.shared_bytes,
                "tensor_cores": report.uses_tensor_cores,
            }
        )
    print(json.dumps(reports))


if __name__ == "__main__":
    _build_jobs_from_stdin()
