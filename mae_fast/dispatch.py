"""One dispatcher for every hot op: backends "reference", "triton", "cuda" and "auto".

Each op registers one implementation per backend together with a ``check`` that returns ``None`` when
the implementation can run the given inputs, or a sentence saying why not. The backend is chosen per
call (``backend=``), per model (the model passes its own) or globally (:func:`set_backend` /
:func:`use_backend`). On GPU inputs "auto" takes the first backend in :data:`AUTO_ORDER` whose check
passes; CPU inputs run the reference (Triton's interpreter runs only when asked for by name).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "reference")
_CHOICES = ("auto",) + BACKENDS


class BackendError(RuntimeError):
    """The requested backend cannot run these inputs; the message lists every reason."""


@dataclass(frozen=True)
class Implementation:
    fn: Callable
    check: Callable[..., str | None]


_registry: dict[str, dict[str, Implementation]] = {}
_global_backend = "auto"


def _always(*args, **kwargs) -> None:
    return None


def register(op: str, backend: str, check: Callable[..., str | None] | None = None):
    """Decorator: register ``fn`` as ``op``'s implementation for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def decorator(fn: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = Implementation(fn, check or _always)
        return fn

    return decorator


def validate_backend(name: str | None, argument: str = "backend") -> str | None:
    if name is not None and name not in _CHOICES:
        raise ValueError(f"{argument} must be one of {_CHOICES} or None, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend ("auto", "reference", "triton" or "cuda")."""
    global _global_backend
    if name is None:
        raise ValueError(f"backend must be one of {_CHOICES}, got None")
    _global_backend = validate_backend(name)


def get_backend() -> str:
    return _global_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed ops with ``name`` as the default backend."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def ops() -> list[str]:
    return sorted(_registry)


def _reason(op: str, backend: str, args, kwargs) -> str | None:
    impl = _implementations(op).get(backend)
    return "not implemented for this op" if impl is None else impl.check(*args, **kwargs)


def explain(op: str, *args, **kwargs) -> dict[str, str | None]:
    """For each backend: ``None`` if it can run these inputs, else the reason it cannot."""
    return {backend: _reason(op, backend, args, kwargs) for backend in AUTO_ORDER}


def resolve(op: str, backend: str | None, *args, **kwargs) -> str:
    """The backend that will run ``op`` on these inputs, or BackendError with every reason.

    Only the candidates are checked: a named backend never depends on the others' availability.
    """
    wanted = validate_backend(backend) or _global_backend
    if wanted != "auto":
        candidates = (wanted,)
    elif any(isinstance(arg, torch.Tensor) and arg.device.type == "cuda" for arg in args):
        candidates = AUTO_ORDER
    else:  # CPU inputs: "auto" never picks Triton's interpreter, which only tests ask for by name
        candidates = ("reference",)
    reasons = {}
    for name in candidates:
        reasons[name] = _reason(op, name, args, kwargs)
        if reasons[name] is None:
            return name
    detail = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    raise BackendError(f"{op}: no usable backend for backend={wanted!r} ({detail})")


def dispatch(op: str, *args, backend: str | None = None, **kwargs):
    """Run ``op`` with the backend :func:`resolve` picks."""
    chosen = resolve(op, backend, *args, **kwargs)
    return _registry[op][chosen].fn(*args, **kwargs)


def _implementations(op: str) -> dict[str, Implementation]:
    if op not in _registry:
        raise KeyError(f"unknown op {op!r}; registered: {ops()}")
    return _registry[op]


# --- availability checks shared by the ops -------------------------------------------------------


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable(*tensors: torch.Tensor | None) -> str | None:
    """Why the Triton kernels cannot run on these tensors, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error})"
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.device.type == "cpu" and not triton_interpreting():
            return "tensors are on the CPU (Triton needs CUDA tensors, or TRITON_INTERPRET=1)"
        if tensor.device.type not in ("cpu", "cuda"):
            return f"tensors are on {tensor.device.type}, Triton runs on CUDA"
    return None


def cuda_extension_unavailable(*tensors: torch.Tensor | None) -> str | None:
    """Why the compiled ``mae_fast._C`` kernels cannot run on these tensors, or None."""
    from mae_fast import _extension

    if not _extension.available():
        return f"the CUDA extension is not loaded ({_extension.unavailable_reason()})"
    for tensor in tensors:
        if tensor is not None and tensor.device.type != "cuda":
            return f"tensors are on {tensor.device.type}, the CUDA extension needs CUDA tensors"
    return None
