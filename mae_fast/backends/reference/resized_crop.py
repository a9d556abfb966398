"""resized_crop: the reference, torchvision's steps per image in plain PyTorch.

torchvision's tensor ``resized_crop(img, top, left, height, width, size, BICUBIC, antialias=True)`` is a
slice of the box and ``F.interpolate(..., mode="bicubic", antialias=True, align_corners=False)``. On a
uint8 image torchvision runs that interpolation in float32 and then clamps to [0, 255] and rounds back to
uint8 (on GPUs and CPUs without AVX2; on AVX2 CPUs torch's native uint8 kernel instead rounds between its
horizontal and vertical passes, like Pillow). This reference takes the float32 route on every device, so
it is the same everywhere: convert to float first, interpolate, clamp, round to uint8 levels; then flip,
divide by 255 and normalise. The test suite checks it against torchvision itself.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from mae_fast import dispatch
from mae_fast.backends.reference._support import SUPPORT
from mae_fast.ops.resized_crop import scale_and_shift


def resized_crop_levels(
    image: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int], compute_dtype=torch.float32
) -> torch.Tensor:
    """One crop resampled to ``size``, clamped to [0, 255], in ``compute_dtype`` (not rounded)."""
    top, left, height, width = box
    crop = image[:, top : top + height, left : left + width].to(compute_dtype)
    if (height, width) == tuple(size):  # torchvision returns the crop unchanged (the weights are the identity)
        return crop
    resized = F.interpolate(crop[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    return resized.clamp(0, 255)


def resized_crop_spec(
    images, boxes, size, flip, mean, std, dtype, compute_dtype=torch.float32, rounded: bool = True
) -> torch.Tensor:
    """The op's specification. ``rounded`` rounds to uint8 levels as torchvision does on uint8 images; with
    ``rounded=False`` and float64 it is the exact interpolant the float backends compute."""
    channels = images[0].shape[0]
    affine = torch.tensor(scale_and_shift(mean, std, channels), dtype=compute_dtype, device=images[0].device)
    flips = [False] * len(images) if flip is None else flip.tolist()
    outputs = []
    for image, box, flipped in zip(images, boxes.tolist(), flips, strict=True):
        levels = resized_crop_levels(image, box, size, compute_dtype)
        if rounded:
            levels = levels.round()
        if flipped:
            levels = levels.flip(-1)
        outputs.append(levels * affine[:, 0, None, None] + affine[:, 1, None, None])
    return torch.stack(outputs).to(dtype)


# uint8 images cannot require grad: no input is differentiable.
RESIZED_CROP = dataclasses.replace(SUPPORT, grad_inputs=())
dispatch.register("resized_crop", "reference", RESIZED_CROP)(resized_crop_spec)
