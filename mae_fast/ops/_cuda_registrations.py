"""Fake (meta) implementations and autograd formulas for the ops of the compiled extension.

Called once, right after ``mae_fast._C`` is imported (see ``mae_fast._extension``), so that
torch.compile can trace the C++ ops and autograd can differentiate them. :data:`SCHEMAS` is the contract
with ``csrc/mae_fast.cpp``: the tests check that the extension registers exactly these.
"""

from __future__ import annotations

import torch

SCHEMAS = {
    "patchify": "mae_fast::patchify(Tensor imgs, int patch_size) -> Tensor",
    "unpatchify": "mae_fast::unpatchify(Tensor patches, int patch_size, int grid_h, int grid_w) -> Tensor",
    "gather_patches": (
        "mae_fast::gather_patches(Tensor imgs, Tensor ids_keep, int patch_size, bool channels_last) -> Tensor"
    ),
    "scatter_patches": (
        "mae_fast::scatter_patches(Tensor grad, Tensor ids_keep, int patch_size, bool channels_last, int channels, "
        "int height, int width) -> Tensor"
    ),
    "patch_embed_gather": (
        "mae_fast::patch_embed_gather(Tensor imgs, Tensor ids_keep, Tensor weight, Tensor? bias, Tensor? pos_embed) "
        "-> Tensor"
    ),
    "unshuffle_mask_tokens": (
        "mae_fast::unshuffle_mask_tokens(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed) -> Tensor"
    ),
    "unshuffle_mask_tokens_backward": (
        "mae_fast::unshuffle_mask_tokens_backward(Tensor grad, Tensor ids_restore, int len_keep, bool mask_token_grad)"
        " -> (Tensor, Tensor)"
    ),
    "masked_mse_loss": (
        "mae_fast::masked_mse_loss(Tensor pred, Tensor imgs, Tensor mask, int patch_size, bool norm_pix, float eps) "
        "-> (Tensor, Tensor)"
    ),
    "random_masking": "mae_fast::random_masking(Tensor noise, int len_keep) -> (Tensor, Tensor, Tensor)",
    "visible_attention": (
        "mae_fast::visible_attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, int max_seqlen, float scale) "
        "-> (Tensor, Tensor)"
    ),
    "visible_attention_backward": (
        "mae_fast::visible_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, "
        "Tensor? cu_seqlens, int max_seqlen, float scale) -> (Tensor, Tensor, Tensor)"
    ),
}


# --- patchify / unpatchify ----------------------------------------------------------------------------


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
    grad = ctx.ops.unpatchify(grad.contiguous(), ctx.patch_size, *ctx.grid)
    return grad, None


def _unpatchify_setup(ctx, inputs, output):
    ctx.patch_size = inputs[1]


def _unpatchify_backward(ctx, grad):
    return ctx.ops.patchify(grad.contiguous(), ctx.patch_size), None, None, None


# --- gather_patches / scatter_patches (each the other's backward) --------------------------------------


def _gather_patches_fake(imgs, ids_keep, patch_size, channels_last):
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], imgs.shape[1] * patch_size * patch_size)


def _scatter_patches_fake(grad, ids_keep, patch_size, channels_last, channels, height, width):
    return grad.new_empty(grad.shape[0], channels, height, width)


def _gather_patches_setup(ctx, inputs, output):
    imgs, ids_keep, patch_size, channels_last = inputs
    ctx.save_for_backward(ids_keep)
    ctx.geometry = (patch_size, channels_last, imgs.shape[1], imgs.shape[2], imgs.shape[3])


def _gather_patches_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    return ctx.ops.scatter_patches(grad, ids_keep, *ctx.geometry), None, None, None


def _scatter_patches_setup(ctx, inputs, output):
    _, ids_keep, patch_size, channels_last = inputs[:4]
    ctx.save_for_backward(ids_keep)
    ctx.patch_size, ctx.channels_last = patch_size, channels_last


def _scatter_patches_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    grad_patches = ctx.ops.gather_patches(grad, ids_keep, ctx.patch_size, ctx.channels_last)
    return grad_patches, None, None, None, None, None, None


# --- patch_embed_gather: gather + GEMM + bias + position rows ------------------------------------------


def _patch_embed_gather_fake(imgs, ids_keep, weight, bias, pos_embed):
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], weight.shape[0])


def _patch_embed_gather_setup(ctx, inputs, output):
    imgs, ids_keep, weight, bias, pos_embed = inputs
    ctx.save_for_backward(imgs, ids_keep, weight)
    ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
    ctx.pos_meta = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)


def _patch_embed_gather_backward(ctx, grad):
    (
        imgs,
        ids_keep,
        weight,
    ) = ctx.saved_tensors
    need_imgs, _, need_weight, need_bias, need_pos = ctx.needs_input_grad
    dim, channels, p, _ = weight.shape
    grad2d = grad.reshape(-1, dim)
    grad_imgs = grad_weight = grad_bias = grad_pos = None
    if need_weight:
        patches = ctx.ops.gather_patches(imgs, ids_keep, p, False)
        grad_weight = (grad2d.t() @ patches.reshape(grad2d.shape[0], -1)).reshape(weight.shape)
    if need_bias:
        grad_bias = grad2d.float().sum(0).to(ctx.bias_meta[1])
    if need_pos:
        shape, dtype = ctx.pos_meta
        rows = torch.zeros(shape[-2], dim, device=grad.device, dtype=torch.float32)
        grad_pos = rows.index_add_(0, ids_keep.reshape(-1), grad2d.float()).to(dtype).reshape(shape)
    if need_imgs:
        grad_patches = (grad2d @ weight.reshape(dim, -1)).reshape(grad.shape[0], grad.shape[1], -1)
        grad_imgs = ctx.ops.scatter_patches(grad_patches, ids_keep, p, False, channels, imgs.shape[2], imgs.shape[3])
    return grad_imgs, None, grad_weight, grad_bias, grad_pos


# --- unshuffle_mask_tokens -----------------------------------------------------------------------------


def _unshuffle_fake(x, mask_token, ids_restore, pos_embed):
    return x.new_empty(x.shape[0], ids_restore.shape[1] + 1, x.shape[2])


def _unshuffle_backward_fake(grad, ids_restore, len_keep, mask_token_grad):
    grad_x = grad.new_empty(grad.shape[0], len_keep + 1, grad.shape[2])
    return grad_x, grad.new_empty(grad.shape[2] if mask_token_grad else 0, dtype=torch.float32)


def _unshuffle_setup(ctx, inputs, output):
    x, mask_token, ids_restore, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.len_keep = x.shape[1] - 1
    ctx.mask_token_meta = (mask_token.shape, mask_token.dtype)
    ctx.pos_meta = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)


def _unshuffle_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    need_x, need_mask_token, _, need_pos = ctx.needs_input_grad
    grad_x, grad_mask_token = ctx.ops.unshuffle_mask_tokens_backward(
        grad, ids_restore, ctx.len_keep, bool(need_mask_token)
    )
    if need_mask_token:
        shape, dtype = ctx.mask_token_meta
        grad_mask_token = grad_mask_token.to(dtype).reshape(shape)
    else:
        grad_mask_token = None
    grad_pos = None
    if need_pos:
        shape, dtype = ctx.pos_meta
        grad_pos = grad.float().sum(0).to(dtype).reshape(shape)
    return grad_x if need_x else None, grad_mask_token, None, grad_pos


# --- masked_mse_loss: the gradient comes out of the forward pass ---------------------------------------


def _masked_mse_loss_fake(pred, imgs, mask, patch_size, norm_pix, eps):
    # The kernel writes the gradient of pred.contiguous(): a contiguous tensor, whatever pred's strides.
    return pred.new_empty((), dtype=torch.float32), torch.empty_like(pred, memory_format=torch.contiguous_format)


def _masked_mse_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _masked_mse_loss_backward(ctx, grad_loss, _grad_of_grad):
    (grad_pred,) = ctx.saved_tensors
    return grad_pred * grad_loss, None, None, None, None, None


# --- random_masking ------------------------------------------------------------------------------------


def _random_masking_fake(noise, len_keep):
    b, length = noise.shape
    return (
        noise.new_empty(b, len_keep, dtype=torch.int64),
        noise.new_empty(b, length, dtype=torch.int64),
        noise.new_empty(b, length, dtype=torch.float32),
    )


# --- visible_attention ---------------------------------------------------------------------------------


def _attention_fake(q, k, v, cu_seqlens, max_seqlen, scale):
    tokens = q.shape[0] * q.shape[1] if q.dim() == 4 else q.shape[0]
    return q.new_empty(q.shape), q.new_empty(q.shape[-2], tokens, dtype=torch.float32)


def _attention_backward_fake(grad_out, q, k, v, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    ctx.save_for_backward(q, k, v, output[1], cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = ctx.ops.visible_attention_backward(grad_out, q, k, v, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


def _with_ops(setup, ops):
    """``setup`` that also stores the op namespace on ctx, for the backward formulas (``ctx.ops.<name>``)."""

    def setup_context(ctx, inputs, output):
        ctx.ops = ops
        setup(ctx, inputs, output)

    return setup_context


def register(namespace: str = "mae_fast") -> None:
    """Register the fakes and autograd formulas for the ops of ``namespace``: ``mae_fast`` (the extension);
    the tests also give them to the CPU emulation of csrc/ (``mae_fast_emu``, tests/cuda_emulation)."""
    ops = getattr(torch.ops, namespace)
    fakes = {
        "patchify": _patchify_fake,
        "unpatchify": _unpatchify_fake,
        "gather_patches": _gather_patches_fake,
        "scatter_patches": _scatter_patches_fake,
        "patch_embed_gather": _patch_embed_gather_fake,
        "unshuffle_mask_tokens": _unshuffle_fake,
        "unshuffle_mask_tokens_backward": _unshuffle_backward_fake,
        "masked_mse_loss": _masked_mse_loss_fake,
        "random_masking": _random_masking_fake,
        "visible_attention": _attention_fake,
        "visible_attention_backward": _attention_backward_fake,
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{name}")(fake)
    autograd = {
        "patchify": (_patchify_backward, _patchify_setup),
        "unpatchify": (_unpatchify_backward, _unpatchify_setup),
        "gather_patches": (_gather_patches_backward, _gather_patches_setup),
        "scatter_patches": (_scatter_patches_backward, _scatter_patches_setup),
        "patch_embed_gather": (_patch_embed_gather_backward, _patch_embed_gather_setup),
        "unshuffle_mask_tokens": (_unshuffle_backward, _unshuffle_setup),
        "masked_mse_loss": (_masked_mse_loss_backward, _masked_mse_loss_setup),
        "visible_attention": (_attention_backward, _attention_setup),
    }
    for name, (backward, setup) in autograd.items():
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=_with_ops(setup, ops))
