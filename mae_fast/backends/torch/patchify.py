"""patchify, unpatchify and patchify_gather as reshapes, permutes and one index of the kept patches."""

from __future__ import annotations

import torch

from mae_fast import dispatch
from mae_fast.backends.torch._support import SUPPORT


def patch_grid(imgs: torch.Tensor, patch_size: int, channels_last: bool) -> torch.Tensor:
    """A view [B, gh, gw, p, p, C] ((i, j, c) order) or [B, gh, gw, C, p, p] ((c, i, j), the Conv2d weight's)."""
    b, c, h, w = imgs.shape
    p = patch_size
    grid = imgs.view(b, c, h // p, p, w // p, p) if imgs.is_contiguous() else imgs.reshape(b, c, h // p, p, w // p, p)
    return grid.permute(0, 2, 4, 3, 5, 1) if channels_last else grid.permute(0, 2, 4, 1, 3, 5)


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, channels_last: bool) -> torch.Tensor:
    """[B, K, p*p*C]: only the K kept patches are read and copied (no patchified copy of the whole image)."""
    grid = patch_grid(imgs, patch_size, channels_last)
    width = grid.shape[2]
    ids = ids_keep.long()
    batch = torch.arange(imgs.shape[0], device=imgs.device).unsqueeze(1)
    return grid[batch, ids // width, ids % width].flatten(2)


@dispatch.register("patchify", "torch", SUPPORT)
def _patchify(imgs, patch_size):
    b = imgs.shape[0]
    return patch_grid(imgs, patch_size, True).reshape(b, -1, patch_size * patch_size * imgs.shape[1])


@dispatch.register("unpatchify", "torch", SUPPORT)
def _unpatchify(x, patch_size, grid_size):
    b, _, values = x.shape
    gh, gw = grid_size
    p = patch_size
    channels = values // (p * p)
    return x.reshape(b, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)


@dispatch.register("patchify_gather", "torch", SUPPORT)
def _patchify_gather(imgs, ids_keep, patch_size):
    return gather_patches(imgs, ids_keep, patch_size, True)
