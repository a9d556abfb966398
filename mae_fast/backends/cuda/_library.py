"""What every op of the CUDA backend shares: its namespace, the primitives csrc/ compiles, the few written
in PyTorch here, availability and the device rule.

:func:`install` defines the primitives under a namespace and registers the PyTorch-written ones for a
dispatch key: ``("mae_fast", "CUDA")`` for the extension (done here),
and ``("mae_fast_emu", "CPU")`` for the tests' CPU emulation of the same kernels.
The extension is imported before its schemas are defined, so that a stale build is reported, not fatal.
"""

from __future__ import annotations

import torch

import mae_fast.ops  # noqa: F401  (declares every op's primitives before they are installed)
from mae_fast import _extension, dispatch, primitives

NAMESPACE = "mae_fast"
#: The primitives csrc/mae_fast.cpp implements.
COMPILED = (
    "patchify",
    "unpatchify",
    "gather_patches",
    "scatter_patches",
    "patch_embed_gather",
    "unshuffle_mask_tokens",
    "unshuffle_mask_tokens_backward",
    "masked_mse_loss",
    "random_masking",
    "visible_attention",
    "visible_attention_backward",
    "qkv_attention",
    "qkv_attention_backward",
)
#: The kernels keep an inverse index per image in shared memory, and launch one grid row per image.
SCATTER_LIMITS = {"patches": 4096, "kept": 4096, "batch": 65535}


def _pos_grad(grad, ids_keep, num_patches):
    """[num_patches, D] fp32: per position row, the sum over the batch of the rows ids_keep names.

    Each image's rows are added into its own [num_patches, D] slice, then the batch is summed in a fixed
    order: bitwise reproducible on a GPU where ids within a row are distinct (as random_masking gives;
    repeats are summed too), unlike one index_add_ over the batch, whose atomics add in a varying order."""
    batch, kept, dim = grad.shape
    rows = torch.zeros(batch, num_patches, dim, device=grad.device, dtype=torch.float32)
    rows.scatter_add_(1, ids_keep.long().unsqueeze(-1).expand(batch, kept, dim), grad.float())
    return rows.sum(0)


def _loss_gradient_factor(grad_loss, saved_grad, mask_sum):
    """What saved_grad is multiplied by: the upstream gradient, and for float16, whose forward saves the
    O(1) residual mask * (pred - target) (csrc/masked_mse_loss.cu), also 2 / (N * mask_sum), in fp32."""
    if saved_grad.dtype != torch.float16:
        return grad_loss
    return grad_loss.float() * 2.0 / (saved_grad.shape[-1] * mask_sum)


def _loss_backward(grad_loss, saved_grad, mask_sum):
    """pred's gradient out of place: saved_grad scaled by the factor above (fp16: in fp32, rounded once)."""
    factor = _loss_gradient_factor(grad_loss, saved_grad, mask_sum)
    if saved_grad.dtype == torch.float16:
        return (saved_grad.float() * factor).to(torch.float16).contiguous()
    return (saved_grad * factor).contiguous()


def _loss_backward_in_place(saved_grad, grad_loss, mask_sum):
    factor = _loss_gradient_factor(grad_loss, saved_grad, mask_sum)
    if saved_grad.dtype == torch.float16:
        saved_grad.copy_(saved_grad.float() * factor)
    else:
        saved_grad.mul_(factor)


IN_PYTORCH = {
    "patch_embed_pos_grad": _pos_grad,
    "masked_mse_loss_backward": _loss_backward,
    "masked_mse_loss_backward_": _loss_backward_in_place,
}


_installed: set[tuple[str, str]] = set()


def install(namespace: str, dispatch_key: str) -> None:
    """Define the CUDA backend's primitives under ``namespace``; the PyTorch-written ones run for ``dispatch_key``.
    Idempotent: a second call (another test module asking for the emulation) changes nothing."""
    library = primitives.install(namespace, COMPILED + tuple(IN_PYTORCH))
    if (namespace, dispatch_key) in _installed:
        return
    for name, fn in IN_PYTORCH.items():
        library.impl(name, fn, dispatch_key)
    _installed.add((namespace, dispatch_key))


_extension.load()  # the extension's kernels register for CUDA first; the schemas come next
try:
    install(NAMESPACE, "CUDA")  # the dispatcher checks every C++ kernel signature against its schema here
except RuntimeError as error:
    _extension.refuse(f"mae_fast._C does not match this mae_fast (built from other sources? rebuild it): {error}")
_extension.check_kernels(NAMESPACE, COMPILED)
OPS = getattr(torch.ops, NAMESPACE)


def available() -> str | None:
    return None if _extension.available() else f"the CUDA extension is not loaded ({_extension.unavailable_reason()})"


def support(kernel: str, **fields) -> dispatch.Support:
    """A declaration with the backend's availability, devices and dtypes (fields override)."""
    fields.setdefault("dtypes", dispatch.KERNEL_FLOATS)
    return dispatch.Support(kernel=kernel, available=available, devices=("cuda",), **fields)
