"""masked_mse_loss: the MAE reconstruction loss (per-patch normalised pixels, mean over removed patches)."""

from __future__ import annotations

import torch

from mae_fast import dispatch, reference
from mae_fast.ops import _validate


def masked_mse_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """0-d fp32 loss: pred [B, L, p*p*C] against patchify(imgs [B, C, H, W]), mask [B, L] (1 = removed).

    With norm_pix, each target patch is (t - mean) / sqrt(var + eps) with the unbiased variance; the
    per-patch MSE is averaged over the patches with mask == 1. The "triton" backend computes pred's
    gradient in the forward and its backward hands that buffer out, so it backpropagates once per
    forward: a second backward through the same graph (retain_graph=True) raises; "reference" allows it.
    """
    b, c, gh, gw = _validate.images(imgs, patch_size)
    _validate.tensor(pred, "pred", 3, _validate.FLOAT_DTYPES)
    expected = (b, gh * gw, patch_size * patch_size * c)
    if tuple(pred.shape) != expected:
        raise ValueError(f"pred must have shape {list(expected)} for these imgs, got {tuple(pred.shape)}")
    _validate.tensor(mask, "mask", 2)
    if tuple(mask.shape) != expected[:2]:
        raise ValueError(f"mask must have shape {list(expected[:2])}, got {tuple(mask.shape)}")
    if norm_pix and patch_size * patch_size * c < 2:
        raise ValueError("norm_pix needs at least 2 values per patch for the unbiased variance")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    _validate.same_device(pred=pred, imgs=imgs, mask=mask)
    return dispatch.dispatch("masked_mse_loss", pred, imgs, mask, patch_size, norm_pix, eps, backend=backend)


dispatch.register("masked_mse_loss", "reference")(reference.masked_mse_loss)

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_check(pred, imgs, mask, patch_size, norm_pix, eps) -> str | None:
    reason = dispatch.triton_unavailable(pred, imgs, mask)
    if reason is not None:
        return reason
    for name, value in (("pred", pred), ("imgs", imgs)):
        if value.dtype not in _TRITON_DTYPES:
            return f"{name} is {value.dtype}; the Triton kernel takes float32, float16 or bfloat16"
    if imgs.requires_grad or mask.requires_grad:
        return (
            "imgs or mask requires grad: the Triton kernel treats the target as a constant, as MAE does "
            "(only pred gets a gradient); the reference backend differentiates them"
        )
    from mae_fast.kernels.masked_mse import MAX_PATCH_VALUES

    if pred.shape[-1] > MAX_PATCH_VALUES:
        return f"patches of {pred.shape[-1]} values exceed the Triton kernel's {MAX_PATCH_VALUES}"
    return None


@dispatch.register("masked_mse_loss", "triton", check=_triton_check)
def _triton_masked_mse_loss(pred, imgs, mask, patch_size, norm_pix, eps):
    from mae_fast.kernels import masked_mse

    return masked_mse.masked_mse_loss(pred, imgs, mask, patch_size, norm_pix, eps)
