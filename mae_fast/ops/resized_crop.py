"""resized_crop: per-sample RandomResizedCrop of variable-size uint8 images, fused with flip and normalisation.

``resized_crop(images, boxes, size)`` crops ``boxes[i]`` = (top, left, height, width) out of ``images[i]``
(uint8 [C, H_i, W_i]), resamples it to ``size`` with antialiased bicubic (torchvision's
``resized_crop(..., InterpolationMode.BICUBIC, antialias=True)``: Keys' cubic with a = -0.5, stretched by
the scale when downscaling, weights normalised to sum 1 at the borders, values clamped to [0, 255]),
flips it horizontally where ``flip`` says, divides by 255 and normalises with ``mean`` / ``std``, and
writes one [B, C, h, w] batch in ``dtype``.

The reference backend rounds to uint8 levels where torchvision does (uint8 in, uint8 out); the torch and
Triton backends keep the interpolant in float (no rounding), so they lie within half a level of it.
The inputs are uint8 and the op has no gradient: no backend differentiates any input.

Primitive (compiled backends): ``resized_crop`` on the packed images (:func:`pack_images`: one flat uint8
buffer with per-image offsets, like cu_seqlens, and per-image heights and widths).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mae_fast import dispatch, primitives
from mae_fast.ops import _validate

OUTPUT_DTYPES = dispatch.ALL_FLOATS
BOX_DTYPES = (torch.int64, torch.int32)


def resized_crop(
    images: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    size: int | Sequence[int],
    flip: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """images: B uint8 [C, H_i, W_i] tensors on one device; boxes int [B, 4] as (top, left, height, width),
    each inside its image; size: an int or (h, w); flip: bool [B] (horizontal flip after the resize) or None;
    mean / std: C numbers each (both or neither), applied after scaling to [0, 1]; dtype: the output's
    (float32 by default). boxes and flip may be CPU tensors (as a loader draws them) or on the images' device.

    Returns [B, C, h, w] in ``dtype``; without mean / std its values lie in [0, 1] like ToTensor's.
    No gradient (the images are uint8).
    """
    images = _images(images)
    device = images[0].device
    channels = images[0].shape[0]
    out_size = _size(size)
    boxes = _boxes(boxes, images, device)
    flip = _flip(flip, len(images), device)
    mean, std = _mean_std(mean, std, channels)
    if dtype is None:
        dtype = torch.float32
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in OUTPUT_DTYPES]} or None, got {dtype!r}")
    return dispatch.dispatch("resized_crop", images, boxes, out_size, flip, mean, std, dtype, backend=backend)


def _images(images) -> tuple[torch.Tensor, ...]:
    if isinstance(images, torch.Tensor) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list or tuple of uint8 [C, H, W] tensors, got {type(images).__name__}")
    if not images:
        raise ValueError("images must hold at least one image, got an empty sequence")
    for index, image in enumerate(images):
        _validate.tensor(image, f"images[{index}]", 3)
        if image.dtype != torch.uint8:
            raise ValueError(f"images[{index}] must be uint8 (decoded pixels), got {image.dtype}")
        if image.shape[1] < 1 or image.shape[2] < 1 or image.shape[0] < 1:
            raise ValueError(f"images[{index}] must have C, H, W >= 1, got shape {tuple(image.shape)}")
    channels = images[0].shape[0]
    for index, image in enumerate(images):
        if image.shape[0] != channels:
            raise ValueError(f"images[{index}] has {image.shape[0]} channels but images[0] has {channels}")
    _validate.same_device(**{f"images[{index}]": image for index, image in enumerate(images)})
    return tuple(images)


def _size(size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    valid = isinstance(pair, Sequence) and len(pair) == 2
    if not valid or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"size must be a positive int or a pair (h, w) of positive ints, got {size!r}")
    return int(pair[0]), int(pair[1])


def _boxes(boxes, images: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
    _validate.tensor(boxes, "boxes", 2)
    if boxes.dtype not in BOX_DTYPES:
        raise ValueError(f"boxes must be int64 or int32, got {boxes.dtype}")
    if tuple(boxes.shape) != (len(images), 4):
        raise ValueError(
            f"boxes must have shape ({len(images)}, 4) (one (top, left, height, width) per image), "
            f"got {tuple(boxes.shape)}"
        )
    if boxes.device not in (device, torch.device("cpu")):
        raise ValueError(f"boxes must be on the CPU or on the images' device {device}, got {boxes.device}")
    if _validate.host_checks_enabled(boxes):  # CPU boxes (free), device boxes with MAE_FAST_CHECK_INDICES=1
        _check_boxes_inside(boxes.cpu(), images)
    return boxes.to(device, non_blocking=True)


def _check_boxes_inside(boxes: torch.Tensor, images: tuple[torch.Tensor, ...]) -> None:
    for index, ((top, left, height, width), image) in enumerate(zip(boxes.tolist(), images, strict=True)):
        image_h, image_w = image.shape[1:]
        if height < 1 or width < 1:
            raise ValueError(f"boxes[{index}] has height {height}, width {width}; both must be >= 1")
        if top < 0 or left < 0 or top + height > image_h or left + width > image_w:
            raise ValueError(
                f"boxes[{index}] = (top={top}, left={left}, height={height}, width={width}) is not inside "
                f"images[{index}] of height {image_h}, width {image_w}: need 0 <= top, top + height <= {image_h}, "
                f"0 <= left, left + width <= {image_w}"
            )


def _flip(flip, batch: int, device: torch.device) -> torch.Tensor | None:
    if flip is None:
        return None
    _validate.tensor(flip, "flip", 1, (torch.bool,))
    if flip.shape[0] != batch:
        raise ValueError(f"flip must have shape ({batch},) (one bool per image), got {tuple(flip.shape)}")
    if flip.device not in (device, torch.device("cpu")):
        raise ValueError(f"flip must be on the CPU or on the images' device {device}, got {flip.device}")
    return flip.to(device, non_blocking=True)


def _numbers(values, name: str, channels: int) -> tuple[float, ...]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, Sequence) or len(values) != channels:
        raise ValueError(f"{name} must be a sequence of {channels} numbers (one per channel), got {values!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{name} must hold numbers, got {values!r}")
    return tuple(float(v) for v in values)


def _mean_std(mean, std, channels: int) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together (or neither, for values in [0, 1])")
    if mean is None:
        return None, None
    mean, std = _numbers(mean, "mean", channels), _numbers(std, "std", channels)
    if not all(0.0 < s < float("inf") for s in std):
        raise ValueError(f"std values must be positive and finite, got {std}")
    if not all(abs(m) < float("inf") for m in mean):
        raise ValueError(f"mean values must be finite, got {mean}")
    return mean, std


def scale_and_shift(mean, std, channels: int) -> list[tuple[float, float]]:
    """Per channel (a, b) with output = a * value + b for a value in [0, 255]: (v / 255 - mean) / std."""
    if mean is None:
        return [(1.0 / 255.0, 0.0)] * channels
    return [(1.0 / (255.0 * s), -m / s) for m, s in zip(mean, std, strict=True)]


# --- packing: one flat buffer, like cu_seqlens -------------------------------------------------------------


@dataclass(frozen=True)
class PackedImages:
    """B uint8 [C, H_i, W_i] images in one buffer: image i is ``pixels[offsets[i]:offsets[i + 1]]`` viewed as
    [C, heights[i], widths[i]]. ``offsets`` int64 [B + 1], ``shapes`` int32 [B, 2] (H_i, W_i): on the device."""

    pixels: torch.Tensor
    offsets: torch.Tensor
    shapes: torch.Tensor
    channels: int


def pack_images(images: Sequence[torch.Tensor]) -> PackedImages:
    """Pack validated images (same device and C) into one contiguous buffer: one copy on the device."""
    device = images[0].device
    heights_widths = [tuple(image.shape[1:]) for image in images]
    sizes = [image.numel() for image in images]
    starts = [0]
    for count in sizes:
        starts.append(starts[-1] + count)
    pixels = torch.cat([image.reshape(-1) for image in images]) if len(images) > 1 else images[0].reshape(-1)
    offsets = torch.tensor(starts, dtype=torch.int64).to(device, non_blocking=True)
    shapes = torch.tensor(heights_widths, dtype=torch.int32).to(device, non_blocking=True)
    return PackedImages(pixels.contiguous(), offsets, shapes, images[0].shape[0])


def _inputs(images, boxes, size, flip, mean, std, dtype) -> dispatch.Inputs:
    tensors = {"images": images[0], "boxes": boxes, "flip": flip}
    sizes = {"batch": len(images), "channels": images[0].shape[0]}
    return dispatch.Inputs(tensors, (), sizes, compute_dtype=dtype)


dispatch.define_op("resized_crop", _inputs)


# --- the primitive: schema and fake (no autograd formula: uint8 inputs) ------------------------------------


@primitives.define(
    "resized_crop(Tensor pixels, Tensor offsets, Tensor shapes, Tensor boxes, Tensor? flip, Tensor scale_shift, "
    "int channels, int out_h, int out_w, ScalarType dtype) -> Tensor"
)
def _resized_crop_fake(pixels, offsets, shapes, boxes, flip, scale_shift, channels, out_h, out_w, dtype):
    return pixels.new_empty((boxes.shape[0], channels, out_h, out_w), dtype=dtype)
