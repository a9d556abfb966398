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

    missing = sorted(set(_cuda_registrations.SCHEMAS) - set(registered_schemas()))
    if missing:  # a _C built from older sources: unusable rather than half-registered
        return None, f"mae_fast._C lacks the ops {missing}: it is stale, rebuild it (pip install -e .)"
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
    """Schema of every op registered under ``torch.ops.mae_fast`` (by the extension), keyed by op name."""
    return {
        schema.name.split("::", 1)[1]: str(schema)
        for schema in torch._C._jit_get_all_schemas()
        if schema.name.startswith("mae_fast::")
    }
