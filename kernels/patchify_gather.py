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

POISON_ENV = "MAE_FAST_POISON_OUTPUTS"
"""When this environment variable is "1", kernel outputs start as NaN (tests: an unwritten element fails)."""


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer; NaN-filled when :data:`POISON_ENV` is set (tests only)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_ENV) == "1":
        out.fill_(float("nan"))
    return out


@triton.jit
def _patch_offsets(
    ids_ptr, row, num_visible, grid_w, offs_e, stride_b, stride_c, stride_h, stride_w,
    P: tl.constexpr, C: tl.constexpr, CONV_ORDER: tl.constexpr,
):  # fmt: skip
    """Image offsets of the values ``offs_e`` of the patch ids_keep.flatten()[row], in the output's order."""
    b = row // num_visible
    patch = tl.load(ids_ptr + row).to(tl.int64)
    top = (patch // grid_w) * P
    left = (patch % grid_w) * P
    if CONV_ORDER:  # (c, i, j)
        c = offs_e // (P * P)
        i = (offs_e // P) % P
        j = offs_e % P
    else:  # (i, j, c)
        i = offs_e // (P * C)
        j = (offs_e // C) % P
        c = offs_e % C
    return b.to(tl.int64) * stride_b + c * stride_c + (top + i) * stride_h + (left + j) * stride_w


@triton.jit
def _gather_kernel(
    imgs_ptr, ids_ptr, out_ptr, num_visible, grid_w,
    stride_b, stride_c, stride_h, stride_w,
    P: tl.constexpr, C: tl.constexpr, CONV_ORDER: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """One program per (visible patch row = b * K + k, block of BLOCK_E values); out is contiguous."""
    row = tl.program_id(0)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    inside = offs_e < P * P * C
    src = _patch_offsets(
        ids_ptr, row, num_visible, grid_w, offs_e, stride_b, stride_c, stride_h, stride_w, P, C, CONV_ORDER
    )
    values = tl.load(imgs_ptr + src, mask=inside)
    tl.store(out_ptr + row.to(tl.int64) * (P * P * C) + offs_e, values, mask=inside)


@triton.jit
def _scatter_kernel(
    src_ptr, ids_ptr, imgs_ptr, num_visible, grid_w,
    stride_b, stride_c, stride_h, stride_w,
    P: tl.constexpr, C: tl.constexpr, CONV_ORDER: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """The adjoint of ``_gather_kernel``: src [B*K, P*P*C] contiguous -> its pixels in imgs."""
    row = tl.program_id(0)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    inside = offs_e < P * P * C
    dst = _patch_offsets(
        ids_ptr, row, num_visible, grid_w, offs_e, stride_b, stride_c, stride_h, stride_w, P, C, CONV_ORDER
    )
    values = tl.load(src_ptr + row.to(tl.int64) * (P * P * C) + offs_e, mask=inside)
    tl.store(imgs_ptr + dst, values, mask=inside)


def block_size(patch_values: int) -> int:
    """Values per program: the whole patch up to 1024 (p = 16, C = 3: 768; p = 14: 588 -> 1024)."""
    return min(1024, triton.next_power_of_2(patch_values))


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
    block = block_size(values)
    grid = (b * k, triton.cdiv(values, block))
    _gather_kernel[grid](
        imgs, ids, out, k, w // patch_size, *imgs.stride(), P=patch_size, C=c, CONV_ORDER=conv_order, BLOCK_E=block
    )
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
    block = block_size(values)
    grid = (b * k, triton.cdiv(values, block))
    _scatter_kernel[grid](
        src, ids, imgs, k, width // patch_size, *imgs.stride(), P=patch_size, C=c, CONV_ORDER=conv_order, BLOCK_E=block
    )
    return imgs
