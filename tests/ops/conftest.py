"""The backend parametrisation of the op tests (see cases.py for the two levels).

- A test taking ``backend`` runs once per dispatch backend: "reference", "triton", "cuda" (marked gpu: skipped
  without a GPU, with the reason), or those named by ``@pytest.mark.backends(...)``.
- A test taking ``ns`` runs once per namespace implementing every primitive named by
  ``@pytest.mark.primitives(...)``: ``mae_fast_triton``, ``mae_fast_emu`` (marked cuda_emulation: skipped
  with the reason where no host compiler or CUDA headers can build the emulation) and ``mae_fast`` (marked
  gpu); ``@pytest.mark.namespaces(...)`` narrows the choice.

The emulation is built once per session (incrementally, into build/cuda_emulation).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from cases import BACKENDS, EMULATION, NAMESPACES, Backend, Namespace, backend_params, namespace_params

from mae_fast import _extension


def pytest_configure(config):
    for line in (
        "backends(*names): the dispatch backends a tests/ops test taking `backend` runs on (default: all)",
        "primitives(*names): the primitives a tests/ops test taking `ns` calls (it runs on every namespace "
        "implementing them)",
        "namespaces(*names): the namespaces a tests/ops test taking `ns` may run on (default: all)",
        "cuda_emulation: runs the CUDA kernels under the CPU emulation of tests/cuda_emulation (builds it once)",
    ):
        config.addinivalue_line("markers", line)


def _marker_args(metafunc, name, default):
    marker = metafunc.definition.get_closest_marker(name)
    return default if marker is None else marker.args


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backend_params(_marker_args(metafunc, "backends", BACKENDS)), indirect=True)
    if "ns" in metafunc.fixturenames:
        needed = _marker_args(metafunc, "primitives", ())
        params = namespace_params(needed, _marker_args(metafunc, "namespaces", NAMESPACES))
        assert params, f"{metafunc.definition.nodeid}: no namespace implements {needed}"
        metafunc.parametrize("ns", params, indirect=True)


def _extension_or_fail() -> None:
    assert _extension.available(), _extension.unavailable_reason()


@pytest.fixture
def backend(request, device) -> Backend:
    """The dispatch backend under test and the device of its inputs (the CUDA one's: the GPU)."""
    if request.param == "cuda":
        _extension_or_fail()
        return Backend("cuda", torch.device("cuda"))
    return Backend(request.param, device)


def _emulation_missing(cuda_include: str) -> str | None:
    """What the emulation's build lacks here (a host compiler, the CUDA headers), or None."""
    if shutil.which("c++") is None:
        return "no host C++ compiler"
    if not os.path.isfile(os.path.join(cuda_include, "cuda_runtime.h")):
        return "no CUDA headers (set CUDA_HOME)"
    return None


@pytest.fixture(scope="session")
def cuda_emulation():
    """Build the CPU emulation of the CUDA kernels (once per session) and return its ops."""
    from cuda_emulation import build as emulation

    from mae_fast.backends.cuda import _library as cuda_library

    missing = _emulation_missing(emulation.cuda_include_dir())
    if missing is not None:
        pytest.skip(f"{missing}: the CUDA emulation cannot be built (these tests did NOT run)")
    cuda_library.install(EMULATION, "CPU")  # the schemas, fakes and formulas the real extension gets
    emulation.build()
    return torch.ops.mae_fast_emu


@pytest.fixture
def ns(request, device) -> Namespace:
    """The namespace under test and the device its primitives run on."""
    if request.param == EMULATION:
        request.getfixturevalue("cuda_emulation")
        return Namespace(EMULATION, torch.device("cpu"))
    if request.param == "mae_fast":
        _extension_or_fail()
        return Namespace("mae_fast", torch.device("cuda"))
    return Namespace(request.param, device)
