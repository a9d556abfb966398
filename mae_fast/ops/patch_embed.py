"""patch_embed_gather: gather of the visible patches + patch-embedding projection + position add."""

from __future__ import annotations

import torch

from mae_fast import dispatch, reference
from mae_fast.ops import _validate
from mae_fast.ops.patchify import repeated_ids_reason


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
    K visible patches only.
    """
    _validate.tensor(weight, "weight", 4, _validate.FLOAT_DTYPES)
    dim, channels, p, q = weight.shape
    if p != q:
        raise ValueError(f"weight must hold square patches [D, C, p, p], got shape {tuple(weight.shape)}")
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


dispatch.register("patch_embed_gather", "reference")(reference.patch_embed_gather)


# --- "triton" backend: a torch.library custom op over kernels/patch_embed.py ------------------------


@torch.library.custom_op("mae_fast_triton::patch_embed_gather", mutates_args=())
def _triton_patch_embed_gather(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
) -> torch.Tensor:
    """-> [B, K, D] in imgs' dtype (weight and bias share it; pos_embed may be any float dtype)."""
    from mae_fast.kernels import patch_embed as kernel

    return kernel.forward(imgs, ids_keep, weight, bias, pos_embed)


@_triton_patch_embed_gather.register_fake
def _(imgs, ids_keep, weight, bias, pos_embed):
    return imgs.new_empty(imgs.shape[0], ids_keep.shape[1], weight.shape[0])


@torch.library.custom_op("mae_fast_triton::patch_embed_pos_grad", mutates_args=())
def _triton_pos_grad(grad_out: torch.Tensor, ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """grad_out [B, K, D] -> [num_patches, D] fp32: sum over the batch of the rows ids_keep names."""
    from mae_fast.kernels import patch_embed as kernel

    return kernel.pos_embed_grad(grad_out, ids_keep, num_patches)


@_triton_pos_grad.register_fake
def _(grad_out, ids_keep, num_patches):
    return grad_out.new_empty(num_patches, grad_out.shape[2], dtype=torch.float32)


def _setup(ctx, inputs, output):
    imgs, ids_keep, weight, _, pos_embed = inputs
    ctx.save_for_backward(imgs, ids_keep, weight)
    ctx.pos = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)


def _backward(ctx, grad):
    """grad_imgs: scatter of grad @ W; grad_weight: grad^T @ gathered patches; bias: sum; pos: batch reduce."""
    imgs, ids_keep, weight = ctx.saved_tensors
    b, k, dim = grad.shape
    _, _, height, width = imgs.shape
    p = weight.shape[-1]
    flat = grad.reshape(b * k, dim)
    grad_imgs = grad_weight = grad_bias = grad_pos = None
    if ctx.needs_input_grad[0]:
        patches = (flat @ weight.reshape(dim, -1)).reshape(b, k, -1)
        grad_imgs = torch.ops.mae_fast_triton.patchify_scatter(patches, ids_keep, p, height, width, True)
    if ctx.needs_input_grad[2]:
        patches = torch.ops.mae_fast_triton.patchify_gather(imgs, ids_keep, p, True).reshape(b * k, -1)
        grad_weight = (flat.t() @ patches).reshape(weight.shape)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.sum(dim=(0, 1))
    if ctx.needs_input_grad[4]:
        shape, dtype = ctx.pos
        grad_pos = torch.ops.mae_fast_triton.patch_embed_pos_grad(grad, ids_keep, height * width // (p * p))
        grad_pos = grad_pos.to(dtype).reshape(shape)
    return grad_imgs, None, grad_weight, grad_bias, grad_pos


_triton_patch_embed_gather.register_autograd(_backward, setup_context=_setup)


def _autocast_dtype(imgs: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a conv / linear in here, or None outside autocast."""
    device_type = imgs.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _triton_check(imgs, ids_keep, weight, bias, pos_embed) -> str | None:
    reason = dispatch.triton_unavailable(imgs, ids_keep, weight, bias, pos_embed)
    if reason is not None:
        return reason
    reason = repeated_ids_reason(ids_keep, "ids_keep")
    if reason is not None:
        return reason
    dtype = _autocast_dtype(imgs) or imgs.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"imgs is {dtype}; the Triton GEMM takes float32, float16 or bfloat16"
    if _autocast_dtype(imgs) is None:
        for name, value in (("weight", weight), ("bias", bias)):
            if value is not None and value.dtype != imgs.dtype:
                return f"{name} is {value.dtype} but imgs is {imgs.dtype}; the Triton GEMM needs one dtype"
    return None


@dispatch.register("patch_embed_gather", "triton", check=_triton_check)
def _triton_patch_embed(imgs, ids_keep, weight, bias, pos_embed):
    """Under autocast imgs, weight and bias are cast to the autocast dtype, as the release's conv would be
    (the casts are differentiable, so fp32 master weights get fp32 gradients); pos_embed is read as is."""
    dtype = _autocast_dtype(imgs)
    if dtype is not None:
        imgs, weight = imgs.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return torch.ops.mae_fast_triton.patch_embed_gather(imgs, ids_keep, weight, bias, pos_embed)
