"""Fused per-sample resized crop: antialiased bicubic, horizontal flip, normalisation, output dtype.

``resized_crop(pixels, offsets, shapes, boxes, flip, scale_shift, channels, out_h, out_w, dtype)`` reads B
uint8 images packed in one flat buffer (image b: ``pixels[offsets[b]:]`` as [C, shapes[b, 0], shapes[b, 1]])
and writes [B, C, out_h, out_w]. The weights are torch's (and Pillow's) antialiased bicubic, computed in
the kernel: along an axis with scale s = in / out, output i has its center at s (i + 0.5), support
2 max(s, 1) source pixels on each side, and source j weighs cubic((j - center + 0.5) / max(s, 1)) (Keys,
a = -0.5), normalised over the sources inside the crop.

One program writes a [BLOCK_Y, BLOCK_X] tile of one channel of one image. It streams the source rows the
tile's outputs cover, resamples each row horizontally once (its taps as BLOCK_X gathered uint8 loads), and
adds it to every output row of the tile with that row's vertical weight (zero outside its support): about
(s_y + 4 max(s_y, 1) / BLOCK_Y) * taps_x loads per output value, no intermediate buffer. The result is
clamped to [0, 255], not rounded, then scaled and shifted per channel ((v / 255 - mean) / std).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mae_fast.kernels._config import UPCAST_BF16, device_guard
from mae_fast.kernels.patchify_gather import new_output


@triton.jit
def _cubic(x):
    """Keys' cubic convolution kernel with a = -0.5 (torch's and Pillow's antialiased bicubic)."""
    x = tl.abs(x)
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = ((x - 5.0) * x + 8.0) * x * -0.5 + 2.0
    return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))


@triton.jit
def _support(in_size, out_size):
    """(scale, support, 1 / max(scale, 1)) of an axis resampled from in_size to out_size."""
    scale = in_size.to(tl.float32) / out_size
    stretch = tl.maximum(scale, 1.0)
    return scale, 2.0 * stretch, 1.0 / stretch


@triton.jit
def _span(index, in_size, scale, support):
    """(center, first source, end source) of output ``index``; the sources are [first, end)."""
    center = scale * (index.to(tl.float32) + 0.5)
    first = tl.maximum(tl.floor(center - support + 0.5), 0.0).to(tl.int32)
    end = tl.minimum(tl.floor(center + support + 0.5).to(tl.int32), in_size)
    return center, first, end


@triton.jit
def _resized_crop_kernel(
    pixels_ptr, offsets_ptr, shapes_ptr, boxes_ptr, flip_ptr, scale_shift_ptr, out_ptr,
    C: tl.constexpr, OUT_H: tl.constexpr, OUT_W: tl.constexpr, HAS_FLIP: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    """Grid (B * C, cdiv(OUT_H, BLOCK_Y), cdiv(OUT_W, BLOCK_X)); out [B, C, OUT_H, OUT_W] contiguous."""
    image = tl.program_id(0) // C
    channel = tl.program_id(0) % C
    height = tl.load(shapes_ptr + image * 2)
    width = tl.load(shapes_ptr + image * 2 + 1)
    top = tl.load(boxes_ptr + image * 4).to(tl.int32)
    left = tl.load(boxes_ptr + image * 4 + 1).to(tl.int32)
    crop_h = tl.load(boxes_ptr + image * 4 + 2).to(tl.int32)
    crop_w = tl.load(boxes_ptr + image * 4 + 3).to(tl.int32)
    plane = pixels_ptr + tl.load(offsets_ptr + image) + channel.to(tl.int64) * height * width

    ys = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xs = tl.program_id(2) * BLOCK_X + tl.arange(0, BLOCK_X)
    scale_x, support_x, inv_x = _support(crop_w, OUT_W)
    center_x, first_x, end_x = _span(xs, crop_w, scale_x, support_x)
    taps_x = (2.0 * support_x).to(tl.int32) + 2  # >= end - first for every output

    weight_sum_x = tl.zeros((BLOCK_X,), dtype=tl.float32)
    for tap in range(0, taps_x):
        col = first_x + tap
        weight_sum_x += tl.where(col < end_x, _cubic((col.to(tl.float32) - center_x + 0.5) * inv_x), 0.0)

    scale_y, support_y, inv_y = _support(crop_h, OUT_H)
    center_y, first_y, end_y = _span(ys, crop_h, scale_y, support_y)
    last_y = tl.minimum(tl.program_id(1) * BLOCK_Y + BLOCK_Y, OUT_H) - 1
    row_first = tl.maximum(tl.floor(scale_y * (tl.program_id(1) * BLOCK_Y + 0.5) - support_y + 0.5), 0.0)
    row_end = tl.minimum(tl.floor(scale_y * (last_y + 0.5) + support_y + 0.5).to(tl.int32), crop_h)

    acc = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    weight_sum_y = tl.zeros((BLOCK_Y,), dtype=tl.float32)
    for row in range(row_first.to(tl.int32), row_end):
        line = plane + (top + row).to(tl.int64) * width + left
        resampled = tl.zeros((BLOCK_X,), dtype=tl.float32)
        for tap in range(0, taps_x):
            col = first_x + tap
            inside = col < end_x
            weight = tl.where(inside, _cubic((col.to(tl.float32) - center_x + 0.5) * inv_x), 0.0)
            resampled += weight * tl.load(line + tl.minimum(col, crop_w - 1), mask=inside, other=0).to(tl.float32)
        in_span = (row >= first_y) & (row < end_y)
        weight_y = tl.where(in_span, _cubic((row - center_y + 0.5) * inv_y), 0.0)
        weight_sum_y += weight_y
        acc += weight_y[:, None] * resampled[None, :]

    inside_out = (ys < OUT_H)[:, None] & (xs < OUT_W)[None, :]
    weight_sum = tl.where(inside_out, weight_sum_y[:, None] * weight_sum_x[None, :], 1.0)  # no 0 / 0 off the tile
    levels = tl.minimum(tl.maximum(acc / weight_sum, 0.0), 255.0)
    values = levels * tl.load(scale_shift_ptr + channel * 2) + tl.load(scale_shift_ptr + channel * 2 + 1)
    if HAS_FLIP:
        flipped = tl.load(flip_ptr + image) != 0
        xs_out = tl.where(flipped, OUT_W - 1 - xs, xs)
    else:
        xs_out = xs
    row_start = (tl.program_id(0).to(tl.int64) * OUT_H + ys) * OUT_W
    tl.store(out_ptr + row_start[:, None] + xs_out[None, :], values.to(out_ptr.dtype.element_ty), mask=inside_out)


#: The row and tap loops run unpipelined (their trip counts differ per image).
NUM_STAGES = 1


def launch_config(out_h: int, out_w: int) -> tuple[int, int, int]:
    """(BLOCK_Y, BLOCK_X, num_warps): 32 x 32 tiles (224 = 7 x 32), smaller for small outputs, 4 values per
    thread (32 x 32 with 4 warps spilled on sm_80; with 8 it builds without spills for sm_80 and sm_90)."""
    block_y, block_x = min(32, triton.next_power_of_2(out_h)), min(32, triton.next_power_of_2(out_w))
    return block_y, block_x, max(1, min(8, block_y * block_x // 128))


def resized_crop(
    pixels: torch.Tensor,
    offsets: torch.Tensor,
    shapes: torch.Tensor,
    boxes: torch.Tensor,
    flip: torch.Tensor | None,
    scale_shift: torch.Tensor,
    channels: int,
    out_h: int,
    out_w: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """pixels uint8 [total], offsets int64 [B + 1], shapes int32 [B, 2], boxes int [B, 4] (validated: inside
    their images), flip bool [B] or None, scale_shift fp32 [C, 2] -> [B, C, out_h, out_w] in ``dtype``.

    The kernel does not bounds-check the boxes: the public op does.
    """
    batch = boxes.shape[0]
    # The interpreter truncates fp32 -> bf16 stores: it writes fp32 there, rounded to bf16 here.
    store_dtype = torch.float32 if UPCAST_BF16 and dtype == torch.bfloat16 else dtype
    out = new_output((batch, channels, out_h, out_w), store_dtype, pixels.device)
    block_y, block_x, num_warps = launch_config(out_h, out_w)
    grid = (batch * channels, triton.cdiv(out_h, block_y), triton.cdiv(out_w, block_x))
    flip_arg = boxes if flip is None else flip.contiguous().view(torch.uint8)  # boxes: a placeholder pointer
    with device_guard(pixels):
        _resized_crop_kernel[grid](
            pixels, offsets, shapes, boxes.contiguous(), flip_arg, scale_shift.contiguous(), out,
            C=channels, OUT_H=out_h, OUT_W=out_w, HAS_FLIP=flip is not None, BLOCK_Y=block_y, BLOCK_X=block_x,
            num_warps=num_warps, num_stages=NUM_STAGES,
        )  # fmt: skip
    return out.to(dtype)
