"""The backends of the hot ops: one package per backend, one module per op inside it.

Each op module registers the backend's implementation of one op of :mod:`mae_fast.ops` with the
dispatcher, together with a :class:`mae_fast.dispatch.Support` declaration of what it runs. Compiled
backends also implement the op's primitives (:mod:`mae_fast.primitives`) under their own namespace.
Importing this package (``import mae_fast`` does) loads every backend. docs/backends.md has the recipe to
add an op or a backend.
"""

from mae_fast.backends import cuda, reference, torch, triton  # noqa: F401
