"""What every op of the Triton backend shares: its namespace, availability and device rule."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

from mae_fast import dispatch, primitives

NAMESPACE = "mae_fast_triton"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
#: The interpreter runs the kernels on CPU tensors; only tests ask for it (by name: "auto" never picks it).
DEVICES = ("cuda", "cpu") if INTERPRETING else ("cuda",)
_DEVICE_HINT = "Triton needs CUDA tensors, or TRITON_INTERPRET=1 for its CPU interpreter"


def _unavailable() -> str | None:
    try:
        from mae_fast.kernels import _config
    except ImportError as error:
        return f"triton is not importable ({error})"
    return _config.interpreter_unusable_reason() if INTERPRETING else None


_availability: list[str | None] = []


def available() -> str | None:
    """Why the Triton kernels cannot run in this environment, or None (decided once, on first use)."""
    if not _availability:
        _availability.append(_unavailable())
    return _availability[0]


def support(kernel: str, **fields) -> dispatch.Support:
    """A declaration with the backend's availability, devices and dtypes (fields override)."""
    fields.setdefault("dtypes", dispatch.KERNEL_FLOATS)
    return dispatch.Support(kernel=kernel, available=available, devices=DEVICES, device_hint=_DEVICE_HINT, **fields)


def implement(names: Iterable[str], implementations: dict[str, Callable]) -> None:
    """Define the primitives ``names`` under the namespace and register their implementations (CPU + CUDA)."""
    library = primitives.install(NAMESPACE, names)
    for name, fn in implementations.items():
        for key in ("CPU", "CUDA"):
            library.impl(name, fn, key)


def ops():
    return getattr(torch.ops, NAMESPACE)
