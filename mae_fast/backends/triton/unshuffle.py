"""unshuffle_mask_tokens on the Triton kernels of kernels/unshuffle.py (ids_restore rows: permutations)."""

from __future__ import annotations

import torch

from mae_fast import dispatch
from mae_fast.backends.triton import _library
from mae_fast.ops import _validate


def _forward(x, mask_token, ids_restore, pos_embed):
    from mae_fast.kernels import unshuffle as kernel

    return kernel.forward(x, mask_token, ids_restore, pos_embed)


def _backward(grad, ids_restore, len_keep, mask_token_grad):
    """The kernel writes per-image partial sums of the masked rows; their fixed-order sum is the mask token's
    gradient (deterministic)."""
    from mae_fast.kernels import unshuffle as kernel

    grad_x, partial = kernel.backward(grad, ids_restore, len_keep)
    grad_mask_token = partial.sum(dim=0) if mask_token_grad else grad.new_empty(0, dtype=torch.float32)
    return grad_x, grad_mask_token


_library.implement(
    ("unshuffle_mask_tokens", "unshuffle_mask_tokens_backward"),
    {"unshuffle_mask_tokens": _forward, "unshuffle_mask_tokens_backward": _backward},
)
OPS = _library.ops()


def _permutations(x, mask_token, ids_restore, pos_embed) -> str | None:
    return _validate.repeated_ids_reason(ids_restore, "ids_restore", permutation=True)


SUPPORT = _library.support("the Triton unshuffle kernel", extra=_permutations)  # it adds in fp32


@dispatch.register("unshuffle_mask_tokens", "triton", SUPPORT)
def _unshuffle_mask_tokens(x, mask_token, ids_restore, pos_embed):
    return OPS.unshuffle_mask_tokens(x, mask_token, ids_restore, pos_embed)
