"""random_masking on the Triton sort kernel (kernels/random_masking.py)."""

from __future__ import annotations

from mae_fast import dispatch
from mae_fast.backends.triton import _library


def _random_masking(noise, len_keep):
    from mae_fast.kernels import random_masking as kernel

    return kernel.random_masking(noise, len_keep)


_library.implement(("random_masking",), {"random_masking": _random_masking})
OPS = _library.ops()
SUPPORT = _library.support("the Triton masking kernel", dtypes=dispatch.ALL_FLOATS)  # float64 noise compares exactly


@dispatch.register("random_masking", "triton", SUPPORT)
def _random_masking_op(noise, len_keep):
    return OPS.random_masking(noise.detach(), len_keep)
