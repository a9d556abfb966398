"""Loading of the compiled ``mae_fast._C`` extension (built by setup.py when CUDA is available).

The extension only implements primitives whose schemas Python defines (see :mod:`mae_fast.primitives` and
:mod:`mae_fast.backends.cuda`); importing it registers its kernels for the CUDA dispatch key, and the
schemas are defined after it, so that a build from other sources (a kernel signature that does not match
its schema) is a Python error the CUDA backend reports, not a crash while the library loads. Without the
extension everything still works through the other backends, and :func:`unavailable_reason` says why.

:func:`load` runs once, when the CUDA backend is imported, and stores what the backend's checks need
(whether the extension loaded, the GPUs' limits) in plain module state: the checks then only read it, so
torch.compile traces them without a graph break.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from mae_fast import dispatch


@dataclass(frozen=True)
class DeviceLimits:
    capability: tuple[int, int]
    shared_memory_per_block: int  # the opt-in maximum a kernel may ask for


@dataclass
class _State:
    module: object | None = None
    reason: str | None = "mae_fast._C has not been loaded yet"
    devices: dict[int, DeviceLimits] = field(default_factory=dict)


_state = _State()
_loaded = False


def load() -> None:
    """Import ``mae_fast._C`` (once) and record the GPUs' limits."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    if importlib.util.find_spec("mae_fast._C") is None:
        _state.reason = (
            "mae_fast._C is not built in this install (setup.py builds it with a CUDA torch, nvcc and a GPU"
            " or TORCH_CUDA_ARCH_LIST; see the README's 'CUDA extension')"
        )
        return
    try:
        from mae_fast import _C
    except ImportError as error:
        _state.reason = f"mae_fast._C could not be imported: {error}"
        return
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        optin = getattr(properties, "shared_memory_per_block_optin", properties.shared_memory_per_block)
        _state.devices[index] = DeviceLimits((properties.major, properties.minor), optin)
    dispatch.record_capabilities({index: limits.capability for index, limits in _state.devices.items()})
    _state.module, _state.reason = _C, None


def check_kernels(namespace: str, compiled: Iterable[str]) -> None:
    """After the schemas are defined: every primitive of ``compiled`` needs a CUDA kernel from the extension, else
    it is stale (built from older sources) and unusable rather than half-registered."""
    if _state.module is None:
        return
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    missing = [name for name in compiled if not has_kernel(f"{namespace}::{name}", "CUDA")]
    if missing:
        refuse(f"mae_fast._C lacks the ops {missing}: it is stale, rebuild it (pip install -e .)")


def refuse(reason: str) -> None:
    """Mark the loaded extension unusable, with the reason the backend will give."""
    _state.module, _state.reason = None, reason


def available() -> bool:
    return _state.module is not None


def unavailable_reason() -> str | None:
    return _state.reason


def module():
    """The loaded extension module (raises if it is not built)."""
    if _state.module is None:
        raise RuntimeError(_state.reason)
    return _state.module


def device_limits(device: torch.device) -> DeviceLimits | None:
    """The limits of a GPU the extension saw at load (None for another device, e.g. a fake one)."""
    return _state.devices.get(device.index if device.index is not None else 0)
