"""patchify, unpatchify and patchify_gather on the Triton gather / scatter kernels (kernels/patchify_gather.py).

The kernels' backward scatters without atomics, so the ids of a row must be distinct (random_masking's are).
"""

from __future__ import annotations

import torch

from mae_fast import dispatch
from mae_fast.backends.triton import _library
from mae_fast.ops import _validate


def _every_patch(batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_patches, device=device).expand(batch, num_patches)


def _gather(imgs, ids_keep, patch_size, channels_last):
    from mae_fast.kernels import patchify_gather as kernel

    return kernel.gather(imgs, ids_keep, patch_size, conv_order=not channels_last)


def _scatter(grad, ids_keep, patch_size, channels_last, channels, height, width):
    from mae_fast.kernels import patchify_gather as kernel

    return kernel.scatter(grad, ids_keep, patch_size, height, width, conv_order=not channels_last)


def _patchify(imgs, patch_size):
    """The gather kernel with every patch kept."""
    b, _, h, w = imgs.shape
    return _gather(imgs, _every_patch(b, (h // patch_size) * (w // patch_size), imgs.device), patch_size, True)


def _unpatchify(patches, patch_size, grid_h, grid_w):
    """The scatter kernel with every patch present: the exact inverse of the patchify above."""
    ids = _every_patch(patches.shape[0], grid_h * grid_w, patches.device)
    channels = patches.shape[2] // (patch_size * patch_size)
    return _scatter(patches, ids, patch_size, True, channels, grid_h * patch_size, grid_w * patch_size)


_library.implement(
    ("patchify", "unpatchify", "gather_patches", "scatter_patches"),
    {"patchify": _patchify, "unpatchify": _unpatchify, "gather_patches": _gather, "scatter_patches": _scatter},
)
OPS = _library.ops()


def _distinct_ids(imgs, ids_keep, patch_size) -> str | None:
    return _validate.repeated_ids_reason(ids_keep, "ids_keep")


# A copy: every float dtype, float64 included.
PATCHIFY = _library.support("the Triton patchify kernel", dtypes=dispatch.ALL_FLOATS)
GATHER = _library.support("the Triton gather kernel", dtypes=dispatch.ALL_FLOATS, extra=_distinct_ids)


@dispatch.register("patchify", "triton", PATCHIFY)
def _patchify_op(imgs, patch_size):
    return OPS.patchify(imgs, patch_size)


@dispatch.register("unpatchify", "triton", PATCHIFY)
def _unpatchify_op(x, patch_size, grid_size):
    return OPS.unpatchify(x, patch_size, *grid_size)


@dispatch.register("patchify_gather", "triton", GATHER)
def _patchify_gather_op(imgs, ids_keep, patch_size):
    return OPS.gather_patches(imgs, ids_keep, patch_size, True)
