"""Lazy loading of the compiled ``mae_fast._C`` extension (built by setup.py when CUDA is available).

Importing it registers its ops under ``torch.ops.mae_fast``; the Python side then adds the fake
(meta) implementations and autograd formulas. Without the extension everything still works through
the other backends, and :func:`unavailable_reason` says why it is missing.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _load() -> tuple[object | None, str | None]:
    try:
        from mae_fast import _C
    except ImportError as error:
        return None, f"mae_fast._C could not be imported: {error}"
    from mae_fast.ops import _cuda_registrations

    _cuda_registrations.register()
    return _C, None


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str | None:
    return _load()[1]


def module():
    """The loaded extension module (raises if it is not built)."""
    ext, reason = _load()
    if ext is None:
        raise RuntimeError(reason)
    return ext


def registered_schemas() -> dict[str, str]:
    """Schema of every op the extension registered under ``torch.ops.mae_fast``."""
    schemas = {}
    for name in dir(torch.ops.mae_fast):
        packet = getattr(torch.ops.mae_fast, name)
        if isinstance(packet, torch._ops.OpOverloadPacket):
            schemas[name] = str(packet.default._schema)
    return schemas
