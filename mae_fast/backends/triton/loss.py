"""masked_mse_loss on the Triton kernels of kernels/masked_mse.py: the loss and pred's gradient in one pass.

The forward saves the gradient of pred for an upstream gradient of 1 (an O(1) residual for float16, which
the backward scales by 2 / (values * mask_sum)); the in-place backward returns at once when the factor is
exactly 1. imgs and mask are constants of the loss (MAE never differentiates its target).
"""

from __future__ import annotations

import torch

from mae_fast import dispatch
from mae_fast.backends.triton import _library
from mae_fast.ops.loss import loss_and_saved_grad


def _forward(pred, imgs, mask, patch_size, norm_pix, eps, store_grad):
    from mae_fast.kernels import masked_mse as kernel

    buffers = kernel.forward_buffers(pred, store_grad)
    kernel.forward_into(pred, imgs, mask, patch_size, norm_pix, eps, **buffers)
    return buffers["loss"], buffers["saved_grad"], buffers["mask_sum"]


def _backward(grad_loss, saved_grad, mask_sum):
    from mae_fast.kernels import masked_mse as kernel

    grad_pred = torch.empty_like(saved_grad, memory_format=torch.contiguous_format)
    kernel.scale_grad_into(saved_grad, grad_loss, mask_sum, grad_pred)
    return grad_pred


def _backward_in_place(saved_grad, grad_loss, mask_sum):
    from mae_fast.kernels import masked_mse as kernel

    kernel.scale_grad_(saved_grad, grad_loss, mask_sum)


_library.implement(
    ("masked_mse_loss", "masked_mse_loss_backward", "masked_mse_loss_backward_"),
    {
        "masked_mse_loss": _forward,
        "masked_mse_loss_backward": _backward,
        "masked_mse_loss_backward_": _backward_in_place,
    },
)
OPS = _library.ops()


#: Largest patch (p*p*C values) one program holds in registers.
MAX_PATCH_VALUES = 8192
SUPPORT = _library.support("the Triton loss kernel", grad_inputs=("pred",), maximum={"patch_values": MAX_PATCH_VALUES})


@dispatch.register("masked_mse_loss", "triton", SUPPORT)
def _masked_mse_loss(pred, imgs, mask, patch_size, norm_pix, eps):
    return loss_and_saved_grad(OPS, pred, imgs, mask, patch_size, norm_pix, eps)
