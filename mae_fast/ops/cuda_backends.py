"""The "cuda" backend of each op: the kernels of the compiled extension ``mae_fast._C``.

The ops' fake implementations and autograd formulas are registered in ``_cuda_registrations`` once the
extension loads. Here each op tells the dispatcher when the extension can run its inputs: a check returns
``None`` or the reason it cannot (so "auto" falls back to Triton, then the reference). Each check first asks
whether the extension is loaded and the tensors are on a GPU, then what the kernels support; that second
part (``*_support``) does not look at the device, so it can be tested anywhere.
"""

from __future__ import annotations

import torch

from mae_fast import _extension, dispatch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
ATTENTION_HEAD_DIMS = (32, 64, 80, 128)
ATTENTION_MAX_SEQLEN = 256
MASKING_MAX_LENGTH = 1024  # one row sorted in shared memory
SCATTER_MAX_PATCHES = 4096  # backward kernels keep an inverse index per image in shared memory
LOSS_MAX_PATCH_NUMEL = 12288  # one target patch per warp in 48 KiB of shared memory
MAX_GRID_Y = 65535


def _dtype_reason(name: str, tensor: torch.Tensor | None, allowed=KERNEL_DTYPES) -> str | None:
    if tensor is not None and tensor.dtype not in allowed:
        return f"{name} dtype {tensor.dtype} is not compiled into the CUDA kernels (they take {list(allowed)})"
    return None


def _first(*reasons: str | None) -> str | None:
    return next((reason for reason in reasons if reason is not None), None)


def _scatter_reason(batch: int, num_patches: int, keep: int, what: str) -> str | None:
    if num_patches > SCATTER_MAX_PATCHES or keep > SCATTER_MAX_PATCHES:
        return f"the CUDA {what} backward supports at most {SCATTER_MAX_PATCHES} patches per image"
    if batch > MAX_GRID_Y:
        return f"the CUDA {what} backward supports at most {MAX_GRID_Y} images"
    return None


# --- patchify / unpatchify -----------------------------------------------------------------------------


def _check(x: torch.Tensor, *args) -> str | None:
    return _first(dispatch.cuda_extension_unavailable(x), _dtype_reason("input", x))


@dispatch.register("patchify", "cuda", check=_check)
def _patchify(imgs, patch_size):
    return torch.ops.mae_fast.patchify(imgs, patch_size)


@dispatch.register("unpatchify", "cuda", check=_check)
def _unpatchify(x, patch_size, grid_size):
    return torch.ops.mae_fast.unpatchify(x, patch_size, grid_size[0], grid_size[1])


# --- patchify_gather -----------------------------------------------------------------------------------


def patchify_gather_support(imgs, ids_keep, patch_size) -> str | None:
    reason = _dtype_reason("imgs", imgs)
    if reason is None and imgs.requires_grad:
        num_patches = (imgs.shape[2] // patch_size) * (imgs.shape[3] // patch_size)
        reason = _scatter_reason(imgs.shape[0], num_patches, ids_keep.shape[1], "patchify_gather")
    return reason


def _check_patchify_gather(imgs, ids_keep, patch_size) -> str | None:
    return _first(
        dispatch.cuda_extension_unavailable(imgs, ids_keep), patchify_gather_support(imgs, ids_keep, patch_size)
    )


@dispatch.register("patchify_gather", "cuda", check=_check_patchify_gather)
def _patchify_gather(imgs, ids_keep, patch_size):
    return torch.ops.mae_fast.gather_patches(imgs, ids_keep, patch_size, True)


# --- patch_embed_gather --------------------------------------------------------------------------------


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would run a conv / linear in on this device type, or None outside autocast."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def patch_embed_gather_support(imgs, ids_keep, weight, bias, pos_embed) -> str | None:
    reason = _first(_dtype_reason("imgs", imgs), _dtype_reason("weight", weight), _dtype_reason("pos_embed", pos_embed))
    if reason is not None:
        return reason
    autocast = _autocast_dtype(imgs.device)
    if autocast is not None and autocast not in KERNEL_DTYPES:
        return f"autocast dtype {autocast} is not compiled into the CUDA kernels"
    for name, tensor in (("weight", weight), ("bias", bias)):
        if autocast is None and tensor is not None and tensor.dtype != imgs.dtype:
            return f"the CUDA GEMM needs {name} in imgs' dtype {imgs.dtype}, got {tensor.dtype}"
    if imgs.requires_grad:
        p = weight.shape[-1]
        num_patches = (imgs.shape[2] // p) * (imgs.shape[3] // p)
        return _scatter_reason(imgs.shape[0], num_patches, ids_keep.shape[1], "patch_embed_gather")
    return None


def _check_patch_embed_gather(imgs, ids_keep, weight, bias, pos_embed) -> str | None:
    return _first(
        dispatch.cuda_extension_unavailable(imgs, ids_keep, weight, bias, pos_embed),
        patch_embed_gather_support(imgs, ids_keep, weight, bias, pos_embed),
    )


@dispatch.register("patch_embed_gather", "cuda", check=_check_patch_embed_gather)
def _patch_embed_gather(imgs, ids_keep, weight, bias, pos_embed):
    """Under autocast imgs, weight and bias are cast to its dtype first, as the release's conv would be (the
    casts are differentiable: fp32 weights get fp32 gradients). Inside the C++ op autocast is off, so its
    output always has the dtype of the imgs it is given, as its fake implementation says."""
    dtype = _autocast_dtype(imgs.device)
    if dtype is not None:
        imgs, weight = imgs.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return torch.ops.mae_fast.patch_embed_gather(imgs, ids_keep, weight, bias, pos_embed)


# --- unshuffle_mask_tokens -----------------------------------------------------------------------------


def unshuffle_mask_tokens_support(x, mask_token, ids_restore, pos_embed) -> str | None:
    reason = _first(
        _dtype_reason("x", x), _dtype_reason("mask_token", mask_token), _dtype_reason("pos_embed", pos_embed)
    )
    needs_backward = any(t is not None and t.requires_grad for t in (x, mask_token, pos_embed))
    if reason is None and needs_backward:  # the backward kernel runs for any of the three gradients
        reason = _scatter_reason(x.shape[0], ids_restore.shape[1], 0, "unshuffle_mask_tokens")
    return reason


def _check_unshuffle(x, mask_token, ids_restore, pos_embed) -> str | None:
    return _first(
        dispatch.cuda_extension_unavailable(x, mask_token, ids_restore, pos_embed),
        unshuffle_mask_tokens_support(x, mask_token, ids_restore, pos_embed),
    )


@dispatch.register("unshuffle_mask_tokens", "cuda", check=_check_unshuffle)
def _unshuffle_mask_tokens(x, mask_token, ids_restore, pos_embed):
    return torch.ops.mae_fast.unshuffle_mask_tokens(x, mask_token, ids_restore, pos_embed)


# --- masked_mse_loss -----------------------------------------------------------------------------------


def masked_mse_loss_support(pred, imgs, mask, patch_size, norm_pix, eps) -> str | None:
    reason = _first(_dtype_reason("pred", pred), _dtype_reason("imgs", imgs))
    if reason is not None:
        return reason
    if imgs.requires_grad or mask.requires_grad:
        return "the CUDA loss differentiates pred only (imgs and mask are constants of the loss)"
    if pred.shape[-1] > LOSS_MAX_PATCH_NUMEL:
        return f"the CUDA loss supports at most {LOSS_MAX_PATCH_NUMEL} values per patch, got {pred.shape[-1]}"
    return None


def _check_loss(pred, imgs, mask, patch_size, norm_pix, eps) -> str | None:
    return _first(
        dispatch.cuda_extension_unavailable(pred, imgs, mask),
        masked_mse_loss_support(pred, imgs, mask, patch_size, norm_pix, eps),
    )


@dispatch.register("masked_mse_loss", "cuda", check=_check_loss)
def _masked_mse_loss(pred, imgs, mask, patch_size, norm_pix, eps):
    return torch.ops.mae_fast.masked_mse_loss(pred, imgs, mask, patch_size, norm_pix, float(eps))[0]


# --- random_masking ------------------------------------------------------------------------------------


def random_masking_support(noise, len_keep) -> str | None:
    reason = _dtype_reason("noise", noise)
    if reason is None and noise.shape[1] > MASKING_MAX_LENGTH:
        reason = f"the CUDA sort holds at most {MASKING_MAX_LENGTH} patches per row, got {noise.shape[1]}"
    return reason


def _check_masking(noise, len_keep) -> str | None:
    return _first(dispatch.cuda_extension_unavailable(noise), random_masking_support(noise, len_keep))


@dispatch.register("random_masking", "cuda", check=_check_masking)
def _random_masking(noise, len_keep):
    return torch.ops.mae_fast.random_masking(noise, len_keep)


# --- visible_attention ---------------------------------------------------------------------------------


def _longest(cu_seqlens: torch.Tensor) -> int:
    """The longest packed sequence (a device sync on a GPU: pass max_seqlen to avoid it)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def visible_attention_support(q, k, v, cu_seqlens, max_seqlen, scale, shared_memory: int | None = None) -> str | None:
    """Why the CUDA attention kernel cannot run these inputs, or None.

    ``shared_memory``: bytes of shared memory a block may use on the device (None: not checked).
    """
    reason = _dtype_reason("q", q, ATTENTION_DTYPES)
    if reason is not None:
        return reason
    head_dim = q.shape[-1]
    if head_dim not in ATTENTION_HEAD_DIMS:
        return f"the CUDA attention kernel supports head dims {ATTENTION_HEAD_DIMS}, got {head_dim}"
    length = q.shape[1] if cu_seqlens is None else (max_seqlen if max_seqlen is not None else _longest(cu_seqlens))
    if length > ATTENTION_MAX_SEQLEN:
        return f"the CUDA attention kernel holds sequences of up to {ATTENTION_MAX_SEQLEN} tokens, got {length}"
    if q.shape[-2] > MAX_GRID_Y:
        return f"the CUDA attention kernel supports at most {MAX_GRID_Y} heads"
    if shared_memory is not None and length > 0:
        needed = _extension.attention_shared_memory(length, head_dim)
        if needed > shared_memory:
            return f"the CUDA attention kernel needs {needed} bytes of shared memory, the device allows {shared_memory}"
    return None


def _check_attention(q, k, v, cu_seqlens, max_seqlen, scale) -> str | None:
    reason = dispatch.cuda_extension_unavailable(q, k, v, cu_seqlens)
    if reason is not None:
        return reason
    limits = _extension.device_limits(q.device)
    if limits.capability < (8, 0):
        major, minor = limits.capability
        return f"the CUDA attention kernel needs compute capability 8.0+, got {major}.{minor}"
    return visible_attention_support(
        q, k, v, cu_seqlens, max_seqlen, scale, shared_memory=limits.shared_memory_per_block
    )


@dispatch.register("visible_attention", "cuda", check=_check_attention)
def _visible_attention(q, k, v, cu_seqlens, max_seqlen, scale):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_seqlens is None:
        max_seqlen = q.shape[1]
    else:
        cu_seqlens = cu_seqlens.contiguous()  # the kernels index its data pointer without strides
        if max_seqlen is None:
            max_seqlen = _longest(cu_seqlens)
    return torch.ops.mae_fast.visible_attention(q, k, v, cu_seqlens, max(max_seqlen, 1), scale)[0]
