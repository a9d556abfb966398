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
    """Visible patches only: [B, C, H, W], ids_keep [B, K] -> [B, K, p*p*C] in (i, j, c) order, imgs' dtype.

    ids_keep is int64 or int32 with distinct values per row (the Triton backend's backward relies on it).
    """
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


# --- "triton" backend: torch.library custom ops over kernels/patchify_gather.py ---------------------
# gather and scatter are each other's adjoint, so each one's backward is the other (double backward
# works too). conv_order=True gives the (c, i, j) order of a Conv2d weight (used by patch_embed_gather).


@torch.library.custom_op("mae_fast_triton::patchify_gather", mutates_args=())
def _triton_gather(
    imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, conv_order: bool = False
) -> torch.Tensor:
    """imgs [B, C, H, W] (any strides), ids_keep [B, K] -> [B, K, p*p*C] contiguous, imgs' dtype."""
    from mae_fast.kernels import patchify_gather as kernel

    return kernel.gather(imgs, ids_keep, patch_size, conv_order)


@_triton_gather.register_fake
def _(imgs, ids_keep, patch_size, conv_order=False):
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], patch_size * patch_size * imgs.shape[1])


@torch.library.custom_op("mae_fast_triton::patchify_scatter", mutates_args=())
def _triton_scatter(
    patches: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, height: int, width: int, conv_order: bool = False
) -> torch.Tensor:
    """patches [B, K, p*p*C] -> [B, C, height, width] contiguous, zero outside the patches ids_keep names."""
    from mae_fast.kernels import patchify_gather as kernel

    return kernel.scatter(patches, ids_keep, patch_size, height, width, conv_order)


@_triton_scatter.register_fake
def _(patches, ids_keep, patch_size, height, width, conv_order=False):
    channels = patches.shape[2] // (patch_size * patch_size)
    return patches.new_empty(patches.shape[0], channels, height, width)


def _gather_setup(ctx, inputs, output):
    imgs, ids_keep, patch_size, conv_order = inputs
    ctx.save_for_backward(ids_keep)
    ctx.geometry = (patch_size, imgs.shape[2], imgs.shape[3], conv_order)


def _gather_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    patch_size, height, width, conv_order = ctx.geometry
    grad_imgs = torch.ops.mae_fast_triton.patchify_scatter(grad, ids_keep, patch_size, height, width, conv_order)
    return grad_imgs, None, None, None


def _scatter_setup(ctx, inputs, output):
    _, ids_keep, patch_size, _, _, conv_order = inputs
    ctx.save_for_backward(ids_keep)
    ctx.geometry = (patch_size, conv_order)


def _scatter_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    patch_size, conv_order = ctx.geometry
    grad_patches = torch.ops.mae_fast_triton.patchify_gather(grad, ids_keep, patch_size, conv_order)
    return grad_patches, None, None, None, None, None


_triton_gather.register_autograd(_gather_backward, setup_context=_gather_setup)
_triton_scatter.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def repeated_ids_reason(ids: torch.Tensor, name: str, permutation: bool = False) -> str | None:
    """Why ``ids`` [B, n] cannot go to the Triton kernels, or None: their backward scatters without atomics,
    so the ids of a row must be distinct (``permutation``: a permutation of 0..n-1). Checked where the
    index ranges are (on the CPU, or with MAE_FAST_CHECK_INDICES=1): on a GPU it would sync every step."""
    if ids.numel() == 0 or not _validate.host_checks_enabled(ids):
        return None
    ordered = ids.sort(dim=1).values
    if permutation:
        if not torch.equal(ordered, torch.arange(ids.shape[1], device=ids.device).expand_as(ordered).to(ids.dtype)):
            return f"{name} rows must be permutations of 0..{ids.shape[1] - 1} (as random_masking returns)"
    elif bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        return f"{name} repeats a patch id within a row; the Triton kernels need distinct ids (as random_masking gives)"
    return None


def _triton_check(imgs, ids_keep, patch_size) -> str | None:
    return dispatch.triton_unavailable(imgs, ids_keep) or repeated_ids_reason(ids_keep, "ids_keep")


@dispatch.register("patchify_gather", "triton", check=_triton_check)
def _triton_patchify_gather(imgs, ids_keep, patch_size):
    return torch.ops.mae_fast_triton.patchify_gather(imgs, ids_keep, patch_size)


def _every_patch(batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_patches, device=device).expand(batch, num_patches)


def _triton_patchify_check(imgs, patch_size) -> str | None:
    return dispatch.triton_unavailable(imgs)


def _triton_unpatchify_check(x, patch_size, grid_size) -> str | None:
    return dispatch.triton_unavailable(x)


@dispatch.register("patchify", "triton", check=_triton_patchify_check)
def _triton_patchify(imgs, patch_size):
    """The gather kernel with every patch kept (differentiable through the same custom ops)."""
    b, _, h, w = imgs.shape
    ids = _every_patch(b, (h // patch_size) * (w // patch_size), imgs.device)
    return torch.ops.mae_fast_triton.patchify_gather(imgs, ids, patch_size)


@dispatch.register("unpatchify", "triton", check=_triton_unpatchify_check)
def _triton_unpatchify(x, patch_size, grid_size):
    """The scatter kernel with every patch present: the exact inverse of the triton patchify."""
    gh, gw = grid_size
    ids = _every_patch(x.shape[0], gh * gw, x.device)
    return torch.ops.mae_fast_triton.patchify_scatter(x, ids, patch_size, gh * patch_size, gw * patch_size)
