"""Gather of the visible patches straight from the NCHW image, and its adjoint scatter.

``gather(imgs, ids_keep, p, conv_order)`` writes [B, K, p*p*C] without a patchified copy of the image:
in the spec's (i, j, c) order (channel last, what ``patchify`` produces) or, with ``conv_order``, in
the (c, i, j) order of a Conv2d weight (what the patch-embedding GEMM multiplies). ``scatter`` is the
exact adjoint: it writes [B, K, p*p*C] values back into a zeroed [B, C, H, W] image. The ids of one
row are distinct (a subset of a permutation), so no two programs write the same pixel: no atomics.

Pure data movement: no arithmetic, so bf16 needs no interpreter upcast here.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from mae_fast.kernels._config import device_guard

POISON_ENV = "MAE_FAST_POISON_OUTPUTS"
"""When this environment variable is "1", kernel outputs start as NaN (tests: an unwritten element fails)."""


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer; NaN-filled when :data:`POISON_ENV` is set (tests only)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_ENV) == "1":
        out.fill_(float("nan"))
    return out


@triton.jit
def _patch_tile(
    ids_ptr, row, num_visible, grid_w, stride_b, stride_c, stride_h, stride_w,
    P: tl.constexpr, C: tl.constexpr, CONV_ORDER: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """A [BLOCK_PIX, BLOCK_C] (pixel, channel) tile of the patch ids_keep.flatten()[row]: its image offsets,
    its offsets in the flattened patch (output order) and its in-bounds mask.

    Pixels run along the first axis, so one channel plane is read in contiguous runs of p values whatever
    the output order; the (i, j, c) store then writes one contiguous run per program.
    """
    b = row // num_visible
    patch = tl.load(ids_ptr + row).to(tl.int64)
    pix = tl.program_id(1) * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    top = (patch // grid_w) * P + pix // P
    left = (patch % grid_w) * P + pix % P
    image = b.to(tl.int64) * stride_b + (top * stride_h + left * stride_w)[:, None] + (c * stride_c)[None, :]
    if CONV_ORDER:  # (c, i, j)
        flat = c[None, :] * (P * P) + pix[:, None]
    else:  # (i, j, c)
        flat = pix[:, None] * C + c[None, :]
    inside = (pix < P * P)[:, None] & (c < C)[None, :]
    return image, flat, inside


@triton.jit
def _gather_kernel(
    imgs_ptr, ids_ptr, out_ptr, num_visible, grid_w,
    stride_b, stride_c, stride_h, stride_w,
    P: tl.constexpr, C: tl.constexpr, CONV_ORDER: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Grid (B*K visible patches, pixel blocks, channel blocks); out [B*K, P*P*C] contiguous."""
    row = tl.program_id(0)
    image, flat, inside = _patch_tile(
        ids_ptr, row, num_visible, grid_w, stride_b, stride_c, stride_h, stride_w, P, C, CONV_ORDER, BLOCK_PIX, BLOCK_C
    )
    values = tl.load(imgs_ptr + image, mask=inside)
    tl.store(out_ptr + row.to(tl.int64) * (P * P * C) + flat, values, mask=inside)


@triton.jit
def _scatter_kernel(
    src_ptr, ids_ptr, imgs_ptr, num_visible, grid_w,
    stride_b, stride_c, stride_h, stride_w,
    P: tl.constexpr, C: tl.constexpr, CONV_ORDER: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The adjoint of ``_gather_kernel``: src [B*K, P*P*C] contiguous -> its pixels in imgs."""
    row = tl.program_id(0)
    image, flat, inside = _patch_tile(
        ids_ptr, row, num_visible, grid_w, stride_b, stride_c, stride_h, stride_w, P, C, CONV_ORDER, BLOCK_PIX, BLOCK_C
    )
    values = tl.load(src_ptr + row.to(tl.int64) * (P * P * C) + flat, mask=inside)
    tl.store(imgs_ptr + image, values, mask=inside)


def block_sizes(patch_size: int, channels: int) -> tuple[int, int]:
    """(BLOCK_PIX, BLOCK_C): up to 16 channels and 1024 values per program (p = 16, C = 3: 256 x 4)."""
    block_c = min(16, triton.next_power_of_2(channels))
    return min(triton.next_power_of_2(patch_size * patch_size), max(16, 1024 // block_c)), block_c


def _grid(rows: int, patch_size: int, channels: int) -> tuple[tuple[int, int, int], int, int]:
    block_pix, block_c = block_sizes(patch_size, channels)
    return (rows, triton.cdiv(patch_size * patch_size, block_pix), triton.cdiv(channels, block_c)), block_pix, block_c


def gather(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, conv_order: bool = False) -> torch.Tensor:
    """imgs [B, C, H, W] (any strides), ids_keep [B, K] int32/int64 -> [B, K, p*p*C] in imgs' dtype.

    Inputs must be validated by the caller (ids in [0, L)); the kernel does not bounds-check.
    """
    b, c, _, w = imgs.shape
    k = ids_keep.shape[1]
    values = patch_size * patch_size * c
    out = new_output((b, k, values), imgs.dtype, imgs.device)
    if out.numel() == 0:
        return out
    ids = ids_keep.contiguous()
    grid, block_pix, block_c = _grid(b * k, patch_size, c)
    with device_guard(imgs):
        _gather_kernel[grid](
            imgs, ids, out, k, w // patch_size, *imgs.stride(),
            P=patch_size, C=c, CONV_ORDER=conv_order, BLOCK_PIX=block_pix, BLOCK_C=block_c,
        )  # fmt: skip
    return out


def scatter(
    patches: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, height: int, width: int, conv_order: bool = False
) -> torch.Tensor:
    """patches [B, K, p*p*C] -> [B, C, height, width] contiguous, zero outside the kept patches."""
    b, k, values = patches.shape
    c = values // (patch_size * patch_size)
    imgs = torch.zeros((b, c, height, width), dtype=patches.dtype, device=patches.device)
    if patches.numel() == 0:
        return imgs
    src = patches.contiguous()
    ids = ids_keep.contiguous()
    grid, block_pix, block_c = _grid(b * k, patch_size, c)
    with device_guard(imgs):
        _scatter_kernel[grid](
            src, ids, imgs, k, width // patch_size, *imgs.stride(),
            P=patch_size, C=c, CONV_ORDER=conv_order, BLOCK_PIX=block_pix, BLOCK_C=block_c,
        )  # fmt: skip
    return imgs
