"""patchify / unpatchify of an image batch, and the gather of the visible patches.

Primitives (one schema, fake and autograd formula for every compiled backend): ``patchify`` and
``unpatchify`` (each the other's backward), ``gather_patches`` and ``scatter_patches`` (each the other's
adjoint; ``channels_last`` picks the (i, j, c) patchify order, else the (c, i, j) order of a Conv2d weight).
"""

from __future__ import annotations

import torch

from mae_fast import dispatch, primitives
from mae_fast.ops import _validate


def patchify(imgs: torch.Tensor, patch_size: int, backend: str | None = None) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C] (row-major patches, (i, j, c) inside a patch); differentiable."""
    _validate.images(imgs, patch_size)
    return dispatch.dispatch("patchify", imgs, patch_size, backend=backend)


def unpatchify(
    x: torch.Tensor, patch_size: int, grid_size: tuple[int, int], backend: str | None = None
) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, gh*p, gw*p], the inverse of :func:`patchify`; differentiable.

    grid_size is the pair (gh, gw) of positive ints with gh * gw = L.
    """
    _validate.tensor(x, "x", 3, _validate.FLOAT_DTYPES)
    _validate.positive_int(patch_size, "patch_size")
    gh, gw = _validate.int_pair(grid_size, "grid_size")
    if x.shape[0] == 0:
        raise ValueError(f"x must hold at least one image, got shape {tuple(x.shape)}")
    if x.shape[2] == 0:
        raise ValueError(f"x must hold at least one value per patch, got shape {tuple(x.shape)}")
    if x.shape[1] != gh * gw:
        raise ValueError(f"x has {x.shape[1]} patches but grid_size {tuple(grid_size)} needs {gh * gw}")
    if x.shape[2] % (patch_size * patch_size):
        raise ValueError(f"x last dimension {x.shape[2]} is not a multiple of patch_size**2 = {patch_size**2}")
    return dispatch.dispatch("unpatchify", x, patch_size, (gh, gw), backend=backend)


def patchify_gather(
    imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, backend: str | None = None
) -> torch.Tensor:
    """Visible patches only: [B, C, H, W], ids_keep [B, K] -> [B, K, p*p*C] in (i, j, c) order, imgs' dtype.

    ids_keep is int64 or int32 with distinct values per row (the Triton backend's backward relies on it).
    """
    b, _, gh, gw = _validate.images(imgs, patch_size)
    _validate.indices(ids_keep, "ids_keep", b, gh * gw)
    _validate.same_device(imgs=imgs, ids_keep=ids_keep)
    return dispatch.dispatch("patchify_gather", imgs, ids_keep, patch_size, backend=backend)


def _patchify_inputs(imgs, patch_size) -> dispatch.Inputs:
    return dispatch.Inputs({"imgs": imgs}, ("imgs",), {"batch": imgs.shape[0]})


def _unpatchify_inputs(x, patch_size, grid_size) -> dispatch.Inputs:
    return dispatch.Inputs({"x": x}, ("x",), {"batch": x.shape[0]})


def _gather_inputs(imgs, ids_keep, patch_size) -> dispatch.Inputs:
    patches = (imgs.shape[2] // patch_size) * (imgs.shape[3] // patch_size)
    sizes = {"batch": imgs.shape[0], "patches": patches, "kept": ids_keep.shape[1]}
    return dispatch.Inputs({"imgs": imgs, "ids_keep": ids_keep}, ("imgs",), sizes)


dispatch.define_op("patchify", _patchify_inputs)
dispatch.define_op("unpatchify", _unpatchify_inputs)
dispatch.define_op("patchify_gather", _gather_inputs)


# --- primitives: schemas, fakes and the one autograd formula of each -----------------------------------


@primitives.define("patchify(Tensor imgs, int patch_size) -> Tensor")
def _patchify_fake(imgs, patch_size):
    b, c, h, w = imgs.shape
    return imgs.new_empty(b, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)


@primitives.define("unpatchify(Tensor patches, int patch_size, int grid_h, int grid_w) -> Tensor")
def _unpatchify_fake(patches, patch_size, grid_h, grid_w):
    channels = patches.shape[2] // (patch_size * patch_size)
    return patches.new_empty(patches.shape[0], channels, grid_h * patch_size, grid_w * patch_size)


@primitives.define("gather_patches(Tensor imgs, Tensor ids_keep, int patch_size, bool channels_last) -> Tensor")
def _gather_patches_fake(imgs, ids_keep, patch_size, channels_last):
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], imgs.shape[1] * patch_size * patch_size)


@primitives.define(
    "scatter_patches(Tensor grad, Tensor ids_keep, int patch_size, bool channels_last, int channels, int height, "
    "int width) -> Tensor"
)
def _scatter_patches_fake(grad, ids_keep, patch_size, channels_last, channels, height, width):
    return grad.new_empty(grad.shape[0], channels, height, width)


def _patchify_setup(ctx, inputs, output):
    imgs, patch_size = inputs
    ctx.patch_size = patch_size
    ctx.grid = (imgs.shape[2] // patch_size, imgs.shape[3] // patch_size)


@primitives.formula("patchify", _patchify_setup)
def _patchify_backward(ctx, grad):
    return ctx.ops.unpatchify(grad.contiguous(), ctx.patch_size, *ctx.grid), None


def _unpatchify_setup(ctx, inputs, output):
    ctx.patch_size = inputs[1]


@primitives.formula("unpatchify", _unpatchify_setup)
def _unpatchify_backward(ctx, grad):
    return ctx.ops.patchify(grad.contiguous(), ctx.patch_size), None, None, None


def _gather_setup(ctx, inputs, output):
    imgs, ids_keep, patch_size, channels_last = inputs
    ctx.save_for_backward(ids_keep)
    ctx.geometry = (patch_size, channels_last, imgs.shape[1], imgs.shape[2], imgs.shape[3])


@primitives.formula("gather_patches", _gather_setup)
def _gather_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    return ctx.ops.scatter_patches(grad.contiguous(), ids_keep, *ctx.geometry), None, None, None


def _scatter_setup(ctx, inputs, output):
    _, ids_keep, patch_size, channels_last = inputs[:4]
    ctx.save_for_backward(ids_keep)
    ctx.patch_size, ctx.channels_last = patch_size, channels_last


@primitives.formula("scatter_patches", _scatter_setup)
def _scatter_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    grad_patches = ctx.ops.gather_patches(grad, ids_keep, ctx.patch_size, ctx.channels_last)
    return grad_patches, None, None, None, None, None, None
