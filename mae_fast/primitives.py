"""The primitives the compiled backends implement, each with one schema, one fake and one autograd formula.

A primitive is a torch.library operator such as ``gather_patches`` or ``visible_attention_backward``.
Every compiled backend implements the primitives it supports under its own namespace (``mae_fast_triton``
for the Triton kernels, ``mae_fast`` for the CUDA extension, ``mae_fast_emu`` for the tests' CPU
emulation of the CUDA kernels) with the SAME schema, so that:

- the schema is written once, here (the CUDA extension only implements it: csrc/ has no schema text);
- the fake (meta) implementation is written once, for torch.compile and FakeTensorMode;
- the autograd formula is written once per op and calls the other primitives through ``ctx.ops``,
  the namespace of the backend that ran the forward.

The ops in :mod:`mae_fast.ops` declare their primitives with :func:`define` and :func:`formula` when
they are imported; a backend then calls :func:`install` for its namespace, which defines the schemas
it implements and registers their fakes and formulas there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Primitive:
    schema: str  # without the namespace: "name(args) -> results"
    fake: Callable
    backward: Callable | None = None
    setup_context: Callable | None = None

    @property
    def name(self) -> str:
        return self.schema.split("(", 1)[0]


_primitives: dict[str, Primitive] = {}
_libraries: dict[str, torch.library.Library] = {}
_installed: dict[str, set[str]] = {}


def define(schema: str):
    """Decorator on the fake implementation of the primitive ``schema`` declares."""

    def decorator(fake: Callable) -> Callable:
        primitive = Primitive(schema, fake)
        if primitive.name in _primitives:
            raise ValueError(f"primitive {primitive.name!r} is defined twice")
        _primitives[primitive.name] = primitive
        return fake

    return decorator


def formula(name: str, setup_context: Callable):
    """Decorator on the one backward of the primitive ``name`` (``ctx.ops`` is the forward's namespace)."""

    def decorator(backward: Callable) -> Callable:
        primitive = _primitives[name]
        _primitives[name] = Primitive(primitive.schema, primitive.fake, backward, setup_context)
        return backward

    return decorator


def schemas() -> dict[str, str]:
    """Every primitive's schema (without namespace), by name."""
    return {name: primitive.schema for name, primitive in sorted(_primitives.items())}


def _with_namespace(setup: Callable, ops) -> Callable:
    def setup_context(ctx, inputs, output):
        ctx.ops = ops
        setup(ctx, inputs, output)

    return setup_context


def install(namespace: str, names: Iterable[str]) -> torch.library.Library:
    """Define the primitives ``names`` under ``namespace`` with their fakes and formulas; returns the library
    through which the backend registers its implementations (``library.impl(name, fn, dispatch_key)``)."""
    names = list(names)
    unknown = sorted(set(names) - set(_primitives))
    if unknown:
        raise KeyError(f"unknown primitives {unknown}; defined: {sorted(_primitives)}")
    library = _libraries.get(namespace)
    if library is None:
        library = _libraries[namespace] = torch.library.Library(namespace, "FRAGMENT")
    done = _installed.setdefault(namespace, set())
    ops = getattr(torch.ops, namespace)
    for name in names:
        if name in done:
            continue
        primitive = _primitives[name]
        library.define(primitive.schema)
        torch.library.register_fake(f"{namespace}::{name}", lib=library)(primitive.fake)
        if primitive.backward is not None:
            setup = _with_namespace(primitive.setup_context, ops)
            torch.library.register_autograd(
                f"{namespace}::{name}", primitive.backward, setup_context=setup, lib=library
            )
        done.add(name)
    return library


def installed(namespace: str) -> set[str]:
    """The primitives defined under ``namespace`` so far."""
    return set(_installed.get(namespace, ()))
