"""resized_crop on the fused Triton kernel of kernels/resized_crop.py (resample, flip, normalise, cast).

The public op's images are packed here into one flat uint8 buffer (one copy on the device) with their
offsets and sizes; the kernel computes its bicubic weights itself, so nothing else is precomputed.
"""

from __future__ import annotations

import torch

from mae_fast import dispatch
from mae_fast.backends.triton import _library
from mae_fast.ops.resized_crop import pack_images, scale_and_shift


def _resized_crop(pixels, offsets, shapes, boxes, flip, scale_shift, channels, out_h, out_w, dtype):
    from mae_fast.kernels import resized_crop as kernel

    return kernel.resized_crop(pixels, offsets, shapes, boxes, flip, scale_shift, channels, out_h, out_w, dtype)


_library.implement(("resized_crop",), {"resized_crop": _resized_crop})
OPS = _library.ops()

# uint8 images cannot require grad: no input is differentiable. float64 outputs are the reference's.
RESIZED_CROP = _library.support("the Triton resized_crop kernel", grad_inputs=())


@dispatch.register("resized_crop", "triton", RESIZED_CROP)
def _resized_crop_op(images, boxes, size, flip, mean, std, dtype):
    packed = pack_images(images)
    affine = torch.tensor(scale_and_shift(mean, std, packed.channels), dtype=torch.float32)
    scale_shift = affine.to(packed.pixels.device, non_blocking=True)
    return OPS.resized_crop(
        packed.pixels, packed.offsets, packed.shapes, boxes, flip, scale_shift, packed.channels, *size, dtype
    )
