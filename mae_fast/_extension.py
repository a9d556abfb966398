"""Loading of the compiled ``mae_fast._C`` extension (built by setup.py when CUDA is available).

Importing it registers its ops under ``torch.ops.mae_fast``; the Python side then adds the fake
(meta) implementations and autograd formulas. Without the extension everything still works through
the other backends, and :func:`unavailable_reason` says why it is missing.

:func:`load` runs once, when ``mae_fast.ops`` is imported, and stores what the dispatcher's checks need
(whether the extension loaded, the attention kernels' shared-memory needs, the GPUs' limits) in plain
module state: the checks then only read it, so torch.compile traces them without a graph break.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DeviceLimits:
    capability: tuple[int, int]
    shared_memory_per_block: int  # the opt-in maximum a kernel may ask for


@dataclass
class _State:
    module: object | None = None
    reason: str | None = "mae_fast._C has not been loaded yet"
    attention_shared_memory: dict[tuple[int, int], int] = field(default_factory=dict)  # (padded N, d) -> bytes
    devices: dict[int, DeviceLimits] = field(default_factory=dict)


_state = _State()
_loaded = False


def load() -> None:
    """Import ``mae_fast._C`` (once) and record what the dispatcher needs to know about it."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        from mae_fast import _C
    except ImportError as error:
        _state.reason = f"mae_fast._C could not be imported: {error}"
        return
    from mae_fast.ops import _cuda_registrations, cuda_backends

    missing = sorted(set(_cuda_registrations.SCHEMAS) - set(registered_schemas()))
    if missing:  # a _C built from older sources: unusable rather than half-registered
        _state.reason = f"mae_fast._C lacks the ops {missing}: it is stale, rebuild it (pip install -e .)"
        return
    _cuda_registrations.register()
    for head_dim in cuda_backends.ATTENTION_HEAD_DIMS:
        for padded in range(16, cuda_backends.ATTENTION_MAX_SEQLEN + 1, 16):
            needed = _C.visible_attention_shared_memory(padded, head_dim)
            _state.attention_shared_memory[(padded, head_dim)] = needed
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        optin = getattr(properties, "shared_memory_per_block_optin", properties.shared_memory_per_block)
        _state.devices[index] = DeviceLimits((properties.major, properties.minor), optin)
    _state.module, _state.reason = _C, None


def available() -> bool:
    return _state.module is not None


def unavailable_reason() -> str | None:
    return _state.reason


def module():
    """The loaded extension module (raises if it is not built)."""
    if _state.module is None:
        raise RuntimeError(_state.reason)
    return _state.module


def attention_shared_memory(max_seqlen: int, head_dim: int) -> int:
    """Bytes of shared memory the CUDA attention kernels need for sequences of up to max_seqlen tokens."""
    padded = -(-max_seqlen // 16) * 16
    return _state.attention_shared_memory[(padded, head_dim)]


def device_limits(device: torch.device) -> DeviceLimits:
    return _state.devices[device.index if device.index is not None else torch.cuda.current_device()]


def registered_schemas() -> dict[str, str]:
    """Schema of every op registered under ``torch.ops.mae_fast`` (by the extension), keyed by op name."""
    return {
        schema.name.split("::", 1)[1]: str(schema)
        for schema in torch._C._jit_get_all_schemas()
        if schema.name.startswith("mae_fast::")
    }
