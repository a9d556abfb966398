"""patch_embed_gather on the Triton gather + GEMM kernel (kernels/patch_embed.py)."""

from __future__ import annotations

from mae_fast import dispatch
from mae_fast.backends.triton import _library
from mae_fast.ops import _validate
from mae_fast.ops.patch_embed import cast_for_autocast, one_dtype_reason


def _forward(imgs, ids_keep, weight, bias, pos_embed):
    """-> [B, K, D] in imgs' dtype (weight and bias share it; pos_embed may be any float dtype)."""
    from mae_fast.kernels import patch_embed as kernel

    return kernel.forward(imgs, ids_keep, weight, bias, pos_embed)


def _pos_grad(grad, ids_keep, num_patches):
    """grad [B, K, D] -> [num_patches, D] fp32: per position row, the sum over the batch (no atomics)."""
    from mae_fast.kernels import patch_embed as kernel

    return kernel.pos_embed_grad(grad, ids_keep, num_patches)


_library.implement(
    ("patch_embed_gather", "patch_embed_pos_grad"), {"patch_embed_gather": _forward, "patch_embed_pos_grad": _pos_grad}
)
OPS = _library.ops()


def _extra(imgs, ids_keep, weight, bias, pos_embed) -> str | None:
    return _validate.repeated_ids_reason(ids_keep, "ids_keep") or one_dtype_reason(imgs, weight, bias)


SUPPORT = _library.support("the Triton patch-embedding GEMM", extra=_extra)


@dispatch.register("patch_embed_gather", "triton", SUPPORT)
def _patch_embed_gather(imgs, ids_keep, weight, bias, pos_embed):
    imgs, weight, bias = cast_for_autocast(imgs, weight, bias)
    return OPS.patch_embed_gather(imgs, ids_keep, weight, bias, pos_embed)
