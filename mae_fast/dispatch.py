"""One dispatcher for every hot op: backends "reference", "torch", "triton", "cuda" and "auto".

An op is declared once (:func:`define_op`) with a function that names what its inputs are: the tensors
by argument name, which of them carry floating-point data, and the sizes a backend may limit (head dim,
sequence length, patches per image, ...). Each backend registers one implementation per op
(:func:`register`) together with a :class:`Support` declaration: devices, dtypes, the inputs it
differentiates, allowed and maximum sizes, the compute capability it needs. One generic function
(:func:`unsupported`) turns a declaration and the inputs into the sentence :func:`explain` prints, so a
refusal always says which argument and which limit. What data cannot express (distinct ids per row, the
shared memory of the device at hand) goes into the declaration's ``extra`` check.

The backend is chosen per call (``backend=``), per model (the model passes its own) or globally
(:func:`set_backend` / :func:`use_backend`). On GPU inputs "auto" takes the first backend in
:data:`AUTO_ORDER` that supports them; on CPU inputs it runs "torch", the fastest plain-PyTorch version
(Triton's interpreter runs only when asked for by name). "reference", the specification tests compare
against, runs only when named. Everything here only reads Python state, so torch.compile traces it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

BACKENDS = ("reference", "torch", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "torch")
_CHOICES = ("auto",) + BACKENDS
ALL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class BackendError(RuntimeError):
    """The requested backend cannot run these inputs; the message lists every reason."""


@dataclass(frozen=True)
class Inputs:
    """What an op's call looks like to a support declaration.

    ``tensors``: every tensor argument by name (None for an absent optional one); ``data``: the names of
    those whose dtype a backend must take; ``sizes``: named sizes a backend may limit; ``compute_dtype``:
    the dtype the op computes in when that is not the data's (autocast), else None.
    """

    tensors: Mapping[str, torch.Tensor | None]
    data: tuple[str, ...]
    sizes: Mapping[str, int] = field(default_factory=dict)
    compute_dtype: torch.dtype | None = None


def _nothing_missing() -> str | None:
    return None


@dataclass(frozen=True)
class Support:
    """What one backend's implementation of one op can run, as data.

    - ``kernel``: how refusals name the implementation ("the Triton attention kernel").
    - ``available``: why the backend cannot run at all here (not importable, not built), or None.
    - ``devices``: device types of the tensors; ``device_hint`` is added to a device refusal.
    - ``dtypes``: dtypes of the data tensors (or of the compute dtype when the op has one).
    - ``grad_inputs``: the inputs it differentiates (None: all); a refusal when another requires grad.
    - ``allowed`` / ``maximum``: per named size, the values it takes / its inclusive upper bound.
    - ``backward_maximum``: bounds that apply only when some input requires grad (the backward's).
    - ``min_capability``: the CUDA compute capability it needs.
    - ``extra``: a check over the op's own arguments for what the fields above cannot say.
    """

    kernel: str
    available: Callable[[], str | None] = _nothing_missing
    devices: tuple[str, ...] | None = None
    device_hint: str = ""
    dtypes: tuple[torch.dtype, ...] = ALL_FLOATS
    grad_inputs: tuple[str, ...] | None = None
    allowed: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    maximum: Mapping[str, int] = field(default_factory=dict)
    backward_maximum: Mapping[str, int] = field(default_factory=dict)
    min_capability: tuple[int, int] | None = None
    extra: Callable[..., str | None] | None = None


@dataclass(frozen=True)
class Implementation:
    fn: Callable
    support: Support


@dataclass(frozen=True)
class _Op:
    inputs: Callable[..., Inputs]
    implementations: dict[str, Implementation] = field(default_factory=dict)


_ops: dict[str, _Op] = {}
_global_backend = "auto"
_capabilities: dict[int, tuple[int, int]] = {}
_recorders: list[list[tuple[str, str]]] = []


def define_op(op: str, inputs: Callable[..., Inputs]) -> None:
    """Declare ``op``; ``inputs`` maps its positional arguments to :class:`Inputs`."""
    if op in _ops:
        raise ValueError(f"op {op!r} is already defined")
    _ops[op] = _Op(inputs)


def register(op: str, backend: str, support: Support):
    """Decorator: register ``fn`` as ``op``'s implementation for ``backend``, supporting what ``support`` says."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    entry = _op(op)

    def decorator(fn: Callable) -> Callable:
        entry.implementations[backend] = Implementation(fn, support)
        return fn

    return decorator


def validate_backend(name: str | None, argument: str = "backend") -> str | None:
    if name is not None and name not in _CHOICES:
        raise ValueError(f"{argument} must be one of {_CHOICES} or None, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend ("auto" or one of :data:`BACKENDS`)."""
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
    return sorted(_ops)


def support(op: str, backend: str) -> Support | None:
    """The declaration of ``backend`` for ``op`` (None: not implemented)."""
    impl = _op(op).implementations.get(backend)
    return None if impl is None else impl.support


def record_capabilities(capabilities: Mapping[int, tuple[int, int]]) -> None:
    """Compute capability per CUDA device index, read by the checks (recorded once, outside any trace)."""
    _capabilities.update(capabilities)


def _capability(device: torch.device) -> tuple[int, int] | None:
    index = device.index if device.index is not None else 0
    if index not in _capabilities and not torch.compiler.is_compiling() and torch.cuda.is_available():
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities.get(index)


def _listing(values) -> str:
    return ", ".join(str(v).replace("torch.", "") for v in values)


def unsupported(spec: Support, inputs: Inputs, args: tuple = ()) -> str | None:
    """The sentence saying why ``spec`` cannot run ``inputs`` (the first reason found), or None."""
    reason = spec.available()
    if reason is not None:
        return reason
    present = {name: t for name, t in inputs.tensors.items() if t is not None}
    for name, tensor in present.items():
        if spec.devices is not None and tensor.device.type not in spec.devices:
            hint = f" ({spec.device_hint})" if spec.device_hint else ""
            return f"{name} is on {tensor.device.type}; {spec.kernel} runs on {_listing(spec.devices)}{hint}"
    if inputs.compute_dtype is not None:
        if inputs.compute_dtype not in spec.dtypes:
            return (
                f"the compute dtype is {_listing([inputs.compute_dtype])}; {spec.kernel} takes {_listing(spec.dtypes)}"
            )
    else:
        for name in inputs.data:
            tensor = present.get(name)
            if tensor is not None and tensor.dtype not in spec.dtypes:
                return f"{name} is {_listing([tensor.dtype])}; {spec.kernel} takes {_listing(spec.dtypes)}"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in present.values())
    if needs_grad and spec.grad_inputs is not None:
        for name, tensor in present.items():
            if tensor.requires_grad and name not in spec.grad_inputs:
                return (
                    f"{name} requires grad; {spec.kernel} differentiates {_listing(spec.grad_inputs)} only "
                    "(the reference backend differentiates every input)"
                )
    for name, allowed in spec.allowed.items():
        if inputs.sizes[name] not in allowed:
            return f"{name} is {inputs.sizes[name]}; {spec.kernel} supports {name} in ({_listing(allowed)})"
    bounds = dict(spec.maximum)
    if needs_grad:
        bounds.update(spec.backward_maximum)
    for name, bound in bounds.items():
        if inputs.sizes[name] > bound:
            which = f"the backward of {spec.kernel}" if name in spec.backward_maximum else spec.kernel
            return f"{name} is {inputs.sizes[name]}; {which} supports {name} <= {bound}"
    if spec.min_capability is not None:
        for tensor in present.values():
            if tensor.device.type == "cuda":
                capability = _capability(tensor.device)
                if capability is not None and capability < spec.min_capability:
                    return (
                        f"{spec.kernel} needs compute capability {'.'.join(map(str, spec.min_capability))}+, "
                        f"the device has {'.'.join(map(str, capability))}"
                    )
                break
    return None if spec.extra is None else spec.extra(*args)


def _reason(entry: _Op, backend: str, inputs: Inputs, args: tuple) -> str | None:
    impl = entry.implementations.get(backend)
    return "not implemented for this op" if impl is None else unsupported(impl.support, inputs, args)


def explain(op: str, *args) -> dict[str, str | None]:
    """For each backend ("auto"'s candidates first): ``None`` if it can run these inputs, else why it cannot."""
    entry = _op(op)
    inputs = entry.inputs(*args)
    order = AUTO_ORDER + tuple(name for name in BACKENDS if name not in AUTO_ORDER)
    return {backend: _reason(entry, backend, inputs, args) for backend in order}


def resolve(op: str, backend: str | None, *args) -> str:
    """The backend that will run ``op`` on these inputs, or BackendError with every reason.

    Only the candidates are checked: a named backend never depends on the others' availability.
    """
    wanted = validate_backend(backend) or _global_backend
    if wanted != "auto":
        candidates = (wanted,)
    elif any(isinstance(arg, torch.Tensor) and arg.device.type == "cuda" for arg in args):
        candidates = AUTO_ORDER
    else:  # CPU inputs: "auto" never picks Triton's interpreter, which only tests ask for by name
        candidates = ("torch",)
    entry = _op(op)
    inputs = entry.inputs(*args)
    reasons = {}
    for name in candidates:
        reasons[name] = _reason(entry, name, inputs, args)
        if reasons[name] is None:
            for picks in _recorders:
                picks.append((op, name))
            return name
    detail = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    raise BackendError(f"{op}: no usable backend for backend={wanted!r} ({detail})")


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, str]]]:
    """Context manager: yields a list that collects (op, backend) for every op resolved inside it."""
    picks: list[tuple[str, str]] = []
    _recorders.append(picks)
    try:
        yield picks
    finally:
        _recorders.remove(picks)


def dispatch(op: str, *args, backend: str | None = None):
    """Run ``op`` with the backend :func:`resolve` picks."""
    chosen = resolve(op, backend, *args)
    return _ops[op].implementations[chosen].fn(*args)


def _op(op: str) -> _Op:
    if op not in _ops:
        raise KeyError(f"unknown op {op!r}; defined: {ops()}")
    return _ops[op]
