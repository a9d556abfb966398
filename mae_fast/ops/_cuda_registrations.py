"""Fake (meta) implementations and autograd formulas for the ops of the compiled extension.

Called once, right after ``mae_fast._C`` is imported (see ``mae_fast._extension``), so that
torch.compile can trace the C++ ops and autograd can differentiate them.
"""

from __future__ import annotations

import torch


def _patchify_fake(imgs, patch_size):
    b, c, h, w = imgs.shape
    return imgs.new_empty(b, (h // patch_size) * (w // patch_size), patch_size * patch_size * c)


def _unpatchify_fake(x, patch_size, grid_h, grid_w):
    channels = x.shape[2] // (patch_size * patch_size)
    return x.new_empty(x.shape[0], channels, grid_h * patch_size, grid_w * patch_size)


def _patchify_setup(ctx, inputs, output):
    imgs, patch_size = inputs
    ctx.patch_size = patch_size
    ctx.grid = (imgs.shape[2] // patch_size, imgs.shape[3] // patch_size)


def _patchify_backward(ctx, grad):
    grad = torch.ops.mae_fast.unpatchify(grad.contiguous(), ctx.patch_size, *ctx.grid)
    return grad, None


def _unpatchify_setup(ctx, inputs, output):
    ctx.patch_size = inputs[1]


def _unpatchify_backward(ctx, grad):
    return torch.ops.mae_fast.patchify(grad.contiguous(), ctx.patch_size), None, None, None


def register() -> None:
    torch.library.register_fake("mae_fast::patchify")(_patchify_fake)
    torch.library.register_fake("mae_fast::unpatchify")(_unpatchify_fake)
    torch.library.register_autograd("mae_fast::patchify", _patchify_backward, setup_context=_patchify_setup)
    torch.library.register_autograd("mae_fast::unpatchify", _unpatchify_backward, setup_context=_unpatchify_setup)
