"""random_masking: noise -> (ids_keep, ids_restore, mask) for the MAE encoder."""

from __future__ import annotations

import torch

from mae_fast import dispatch, primitives, reference
from mae_fast.ops import _validate


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep K = int(L * (1 - mask_ratio)) patches per image, those with the smallest noise.

    noise [B, L] (uniform [0, 1) drawn with ``generator`` when None) fixes the choice. Returns
    ids_keep [B, K] int64 (in ascending noise order, as the release), ids_restore [B, L] int64 and
    mask [B, L] float32 (1 = removed). Ties in noise go to the lower patch index. NaN noise is
    rejected where that needs no device sync (CPU tensors, or MAE_FAST_CHECK_INDICES=1); elsewhere the
    reference and Triton backends sort NaN above every number, as torch.sort does.
    """
    _validate.positive_int(batch_size, "batch_size")
    _validate.positive_int(num_patches, "num_patches")
    ratio = _validate.mask_ratio(mask_ratio)
    len_keep = reference.num_kept(num_patches, ratio)
    if len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of {num_patches}")
    if noise is None:
        noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    else:
        _validate.tensor(noise, "noise", 2, _validate.FLOAT_DTYPES)
        if tuple(noise.shape) != (batch_size, num_patches):
            raise ValueError(f"noise must have shape [{batch_size}, {num_patches}], got {tuple(noise.shape)}")
        if _validate.host_checks_enabled(noise) and bool(noise.isnan().any()):
            raise ValueError("noise must not contain NaN (its order would be meaningless)")
    return dispatch.dispatch("random_masking", noise, len_keep, backend=backend)


def _inputs(noise, len_keep) -> dispatch.Inputs:
    return dispatch.Inputs({"noise": noise}, ("noise",), {"batch": noise.shape[0], "patches": noise.shape[1]})


dispatch.define_op("random_masking", _inputs)


@primitives.define("random_masking(Tensor noise, int len_keep) -> (Tensor, Tensor, Tensor)")
def _random_masking_fake(noise, len_keep):
    """-> (ids_keep [B, K] int64, ids_restore [B, L] int64, mask [B, L] fp32); not differentiable."""
    b, length = noise.shape
    return (
        noise.new_empty(b, len_keep, dtype=torch.int64),
        noise.new_empty(b, length, dtype=torch.int64),
        noise.new_empty(b, length, dtype=torch.float32),
    )
