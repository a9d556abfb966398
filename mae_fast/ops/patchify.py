"""patchify / unpatchify of an image batch, and the gather of the visible patches."""

from __future__ import annotations

import torch

from mae_fast import dispatch, reference
from mae_fast.ops import _validate


def patchify(imgs: torch.Tensor, patch_size: int, backend: str | None = None) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] (row-major patches, (i, j, c) inside a patch); differentiable."""
    _validate.images(imgs, patch_size)
    return dispatch.dispatch("patchify", imgs, patch_size, backend=backend)


def unpatchify(
    x: torch.Tensor, patch_size: int, grid_size: tuple[int, int], backend: str | None = None
) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, gh*p, gw*p], the inverse of :func:`patchify`; differentiable."""
    _validate.tensor(x, "x", 3, _validate.FLOAT_DTYPES)
    _validate.positive_int(patch_size, "patch_size")
    gh, gw = grid_size
    if x.shape[1] != gh * gw:
        raise ValueError(f"x has {x.shape[1]} patches but grid_size {tuple(grid_size)} needs {gh * gw}")
    if x.shape[2] % (patch_size * patch_size):
        raise ValueError(f"x last dimension {x.shape[2]} is not a multiple of patch_size**2 = {patch_size**2}")
    return dispatch.dispatch("unpatchify", x, patch_size, (gh, gw), backend=backend)


def patchify_gather(
    imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, backend: str | None = None
) -> torch.Tensor:
    """Visible patches only: [B, C, H, W], ids_keep [B, K] -> [B, K, p*p*C] in (i, j, c) order."""
    b, _, gh, gw = _validate.images(imgs, patch_size)
    _validate.indices(ids_keep, "ids_keep", b, gh * gw)
    _validate.same_device(imgs=imgs, ids_keep=ids_keep)
    return dispatch.dispatch("patchify_gather", imgs, ids_keep, patch_size, backend=backend)


dispatch.register("patchify", "reference")(reference.patchify)
dispatch.register("patchify_gather", "reference")(reference.patchify_gather)


@dispatch.register("unpatchify", "reference")
def _unpatchify_reference(x, patch_size, grid_size):
    channels = x.shape[2] // (patch_size * patch_size)
    return reference.unpatchify(x, patch_size, grid_size, channels)
