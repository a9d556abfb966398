"""Test setup: Triton's interpreter on machines without a GPU, the gpu marker, shared fixtures.

TRITON_INTERPRET must be set before any module holding @triton.jit kernels is imported, so this file
does it first, before mae_fast is imported anywhere.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

GPU_SKIP_REASON = "needs a CUDA GPU; none is visible here (this test did NOT run: unverified, not passed)"


def pytest_configure(config):
    """Stop at once, with the reason and the fix, where the interpreter these tests need cannot run (one clear
    error instead of a failure per kernel test); GPU runs, without TRITON_INTERPRET, never stop here."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from mae_fast.kernels._config import interpreter_unusable_reason
    except Exception:  # an import error is for collection to report, with its traceback
        return
    reason = interpreter_unusable_reason()
    if reason is not None:
        message = f"the kernel tests need Triton's interpreter without a GPU. {reason}"
        pytest.exit(message, returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU through Triton's interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, reproducible from the test's name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _thread_count_unchanged(request):
    """A test that leaves torch's CPU thread count changed fails here: later tests in the process would run
    their GEMMs with other reduction orders than the subprocesses they are compared with."""
    threads = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    torch.set_num_threads(threads)
    assert after == threads, f"{request.node.nodeid} left torch's thread count at {after} (it was {threads})"
