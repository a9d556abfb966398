"""patch_embed_gather: gather of the visible patches + patch-embedding projection + position add.

Primitives: ``patch_embed_gather`` (forward) and ``patch_embed_pos_grad`` (the position table's gradient,
a per-row sum over the batch); the backward also uses ``gather_patches`` / ``scatter_patches`` in the
Conv2d weight's (c, i, j) order.
"""

from __future__ import annotations

import torch

from mae_fast import dispatch, primitives
from mae_fast.ops import _validate


def patch_embed_gather(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Embed only the visible patches: -> [B, K, D].

    imgs [B, C, H, W]; ids_keep [B, K]; weight [D, C, p, p] (the Conv2d layout, so checkpoints load
    unchanged); bias [D] or None; pos_embed [L, D] or [1, L, D] (patch rows, no cls row) or None.
    Equals ``gather(conv2d(imgs, weight, bias, stride=p) + pos_embed, ids_keep)`` with a GEMM over the
    K visible patches only. Under autocast imgs, weight and bias are cast to its dtype, as a conv would be.
    """
    _validate.tensor(weight, "weight", 4, _validate.FLOAT_DTYPES)
    dim, channels, p, q = weight.shape
    if p != q:
        raise ValueError(f"weight must hold square patches [D, C, p, p], got shape {tuple(weight.shape)}")
    if not (dim and channels and p):
        raise ValueError(f"weight [D, C, p, p] must have no zero dimension, got shape {tuple(weight.shape)}")
    b, c, gh, gw = _validate.images(imgs, p)
    if c != channels:
        raise ValueError(f"imgs has {c} channels but weight expects {channels} (weight shape {tuple(weight.shape)})")
    _validate.indices(ids_keep, "ids_keep", b, gh * gw)
    if bias is not None:
        _validate.tensor(bias, "bias", 1, _validate.FLOAT_DTYPES)
        if bias.shape[0] != dim:
            raise ValueError(f"bias must have shape [{dim}], got {tuple(bias.shape)}")
    if pos_embed is not None:
        _validate.tensor(pos_embed, "pos_embed", (2, 3), _validate.FLOAT_DTYPES)
        if pos_embed.shape[-2:] != (gh * gw, dim) or pos_embed.numel() != gh * gw * dim:
            raise ValueError(
                f"pos_embed must have shape [{gh * gw}, {dim}] or [1, {gh * gw}, {dim}] (patch rows only), "
                f"got {tuple(pos_embed.shape)}"
            )
    _validate.same_device(imgs=imgs, ids_keep=ids_keep, weight=weight, bias=bias, pos_embed=pos_embed)
    return dispatch.dispatch("patch_embed_gather", imgs, ids_keep, weight, bias, pos_embed, backend=backend)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would run a conv / linear in on this device type, or None outside autocast."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def one_dtype_reason(imgs, weight, bias) -> str | None:
    """Outside autocast a fused GEMM needs weight and bias in imgs' dtype; the reason it cannot run, or None."""
    if autocast_dtype(imgs.device) is None:
        for name, tensor in (("weight", weight), ("bias", bias)):
            if tensor is not None and tensor.dtype != imgs.dtype:
                return f"{name} is {tensor.dtype} but imgs is {imgs.dtype}; the fused GEMM needs one dtype"
    return None


def cast_for_autocast(imgs, weight, bias):
    """imgs, weight and bias in the autocast dtype (differentiable casts: fp32 weights get fp32 gradients)."""
    dtype = autocast_dtype(imgs.device)
    if dtype is None:
        return imgs, weight, bias
    return imgs.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _inputs(imgs, ids_keep, weight, bias, pos_embed) -> dispatch.Inputs:
    p = weight.shape[-1]
    patches = (imgs.shape[2] // p) * (imgs.shape[3] // p)
    tensors = {"imgs": imgs, "ids_keep": ids_keep, "weight": weight, "bias": bias, "pos_embed": pos_embed}
    sizes = {"batch": imgs.shape[0], "patches": patches, "kept": ids_keep.shape[1]}
    return dispatch.Inputs(tensors, ("imgs", "weight", "bias", "pos_embed"), sizes, autocast_dtype(imgs.device))


dispatch.define_op("patch_embed_gather", _inputs)


# --- primitives ------------------------------------------------------------------------------------------


@primitives.define(
    "patch_embed_gather(Tensor imgs, Tensor ids_keep, Tensor weight, Tensor? bias, Tensor? pos_embed) -> Tensor"
)
def _patch_embed_gather_fake(imgs, ids_keep, weight, bias, pos_embed):
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], weight.shape[0])


@primitives.define("patch_embed_pos_grad(Tensor grad, Tensor ids_keep, int num_patches) -> Tensor")
def _pos_grad_fake(grad, ids_keep, num_patches):
    return grad.new_empty(num_patches, grad.shape[2], dtype=torch.float32)


def _setup(ctx, inputs, output):
    imgs, ids_keep, weight, bias, pos_embed = inputs
    ctx.save_for_backward(imgs, ids_keep, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.pos = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)


@primitives.formula("patch_embed_gather", _setup)
def _backward(ctx, grad):
    """imgs: scatter of grad @ W; weight: grad^T @ the gathered patches; bias: a sum; pos_embed: per-row sums."""
    imgs, ids_keep, weight = ctx.saved_tensors
    need_imgs, _, need_weight, need_bias, need_pos = ctx.needs_input_grad
    dim, channels, p, _ = weight.shape
    b, k, _ = grad.shape
    rows = grad.reshape(b * k, dim)
    grad_imgs = grad_weight = grad_bias = grad_pos = None
    if need_imgs:
        grad_patches = (rows @ weight.reshape(dim, -1)).reshape(b, k, -1)
        grad_imgs = ctx.ops.scatter_patches(grad_patches, ids_keep, p, False, channels, imgs.shape[2], imgs.shape[3])
    if need_weight:
        patches = ctx.ops.gather_patches(imgs, ids_keep, p, False).reshape(b * k, -1)
        grad_weight = (rows.t() @ patches).reshape(weight.shape)
    if need_bias:
        grad_bias = rows.float().sum(0).to(ctx.bias_dtype)
    if need_pos:
        shape, dtype = ctx.pos
        num_patches = (imgs.shape[2] // p) * (imgs.shape[3] // p)
        grad_pos = ctx.ops.patch_embed_pos_grad(grad.contiguous(), ids_keep, num_patches).to(dtype).reshape(shape)
    return grad_imgs, None, grad_weight, grad_bias, grad_pos
