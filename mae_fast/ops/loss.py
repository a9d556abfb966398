"""masked_mse_loss: the MAE reconstruction loss (per-patch normalised pixels, mean over removed patches).

Primitives: ``masked_mse_loss`` computes the loss and, when ``store_grad``, the gradient of pred in the
same pass (``saved_grad``: the final gradient for an upstream gradient of 1, or a residual that the
backend's backward primitives know how to scale; ``mask_sum`` is the count of removed patches).
``masked_mse_loss_backward_`` turns saved_grad into pred's gradient in place (eager backward: it costs
nothing for an upstream gradient of 1 where the backend skips the unit scale), ``masked_mse_loss_backward``
does the same out of place (the graph torch.compile traces stays functional).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from mae_fast import dispatch, primitives
from mae_fast.ops import _validate


def masked_mse_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """0-d fp32 loss: pred [B, L, p*p*C] against patchify(imgs [B, C, H, W]), mask [B, L] (1 = removed).

    With norm_pix, each target patch is (t - mean) / sqrt(var + eps) with the unbiased variance; the
    per-patch MSE is averaged over the patches with mask == 1 (other non-negative values weight a patch:
    sum(per_patch * mask) / sum(mask)). A complex mask is a TypeError. A mask with a negative, NaN or inf
    value, or one that removes nothing (sum 0, whose mean is undefined), is a ValueError where the check
    needs no device sync: CPU tensors outside torch.compile, or any device with MAE_FAST_CHECK_INDICES=1
    (on a GPU it would stall the stream every step; there such a mask gives NaN or inf).

    The compiled backends compute pred's gradient in the forward and their backward hands that buffer
    out, so they backpropagate once per forward: a second backward through the same graph
    (retain_graph=True) raises; "reference" allows it.
    """
    b, c, gh, gw = _validate.images(imgs, patch_size)
    _validate.tensor(pred, "pred", 3, _validate.FLOAT_DTYPES)
    expected = (b, gh * gw, patch_size * patch_size * c)
    if tuple(pred.shape) != expected:
        raise ValueError(f"pred must have shape {list(expected)} for these imgs, got {tuple(pred.shape)}")
    _validate.tensor(mask, "mask", 2)
    if tuple(mask.shape) != expected[:2]:
        raise ValueError(f"mask must have shape {list(expected[:2])}, got {tuple(mask.shape)}")
    _validate.flag(norm_pix, "norm_pix")
    if norm_pix and patch_size * patch_size * c < 2:
        raise ValueError("norm_pix needs at least 2 values per patch for the unbiased variance")
    _validate.positive_finite(eps, "eps")
    _validate.same_device(pred=pred, imgs=imgs, mask=mask)
    _validate.mask_weights(mask)
    return dispatch.dispatch("masked_mse_loss", pred, imgs, mask, patch_size, norm_pix, eps, backend=backend)


def _inputs(pred, imgs, mask, patch_size, norm_pix, eps) -> dispatch.Inputs:
    tensors = {"pred": pred, "imgs": imgs, "mask": mask}
    return dispatch.Inputs(tensors, ("pred", "imgs"), {"patch_values": pred.shape[-1]})


dispatch.define_op("masked_mse_loss", _inputs)


# --- primitives ------------------------------------------------------------------------------------------


@primitives.define(
    "masked_mse_loss(Tensor pred, Tensor imgs, Tensor mask, int patch_size, bool norm_pix, float eps, "
    "bool store_grad) -> (Tensor, Tensor, Tensor)"
)
def _loss_fake(pred, imgs, mask, patch_size, norm_pix, eps, store_grad):
    """-> (loss 0-d fp32, saved_grad [B, L, p*p*C] contiguous in pred's dtype or [0], mask_sum 0-d fp32)."""
    saved_shape = tuple(pred.shape) if store_grad else (0,)
    saved_grad = torch.empty(saved_shape, dtype=pred.dtype, device=pred.device)
    return pred.new_empty((), dtype=torch.float32), saved_grad, pred.new_empty((), dtype=torch.float32)


@primitives.define("masked_mse_loss_backward(Tensor grad_loss, Tensor saved_grad, Tensor mask_sum) -> Tensor")
def _loss_backward_fake(grad_loss, saved_grad, mask_sum):
    return torch.empty_like(saved_grad, memory_format=torch.contiguous_format)


@primitives.define("masked_mse_loss_backward_(Tensor(a!) saved_grad, Tensor grad_loss, Tensor mask_sum) -> ()")
def _loss_backward_in_place_fake(saved_grad, grad_loss, mask_sum):
    return None


def loss_and_saved_grad(ops, pred, imgs, mask, patch_size, norm_pix, eps) -> torch.Tensor:
    """The loss through the primitive of namespace ``ops``, storing the gradient only when one will be asked."""
    store_grad = pred.requires_grad and torch.is_grad_enabled()
    return ops.masked_mse_loss(pred, imgs, mask, patch_size, norm_pix, float(eps), store_grad)[0]


def _is_traced(saved_grad: torch.Tensor) -> bool:
    """Whether the backward is being traced into a graph (torch.compile, or AOTAutograd / make_fx on fakes)."""
    return torch.compiler.is_compiling() or is_fake(saved_grad)


def _setup(ctx, inputs, output):
    _, saved_grad, mask_sum = output
    ctx.save_for_backward(saved_grad, mask_sum)
    ctx.mark_non_differentiable(saved_grad, mask_sum)
    ctx.saved_grad_consumed = False


@primitives.formula("masked_mse_loss", _setup)
def _backward(ctx, grad_loss, _grad_saved_grad, _grad_mask_sum):
    nothing = (None,) * 6
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError(
            "masked_mse_loss gives no gradient for imgs or mask on the compiled backends (the MAE target is a "
            "constant); use backend='reference' to differentiate them"
        )
    if not ctx.needs_input_grad[0]:
        return (None, *nothing)
    if ctx.saved_grad_consumed:
        raise RuntimeError(
            "masked_mse_loss: a second backward through the same graph (retain_graph=True) is not supported: "
            "the first backward scaled the gradient saved by the forward in place and handed it out as pred's "
            "gradient, so it is gone; run the forward again, or use backend='reference', which supports "
            "repeated backward passes"
        )
    saved_grad, mask_sum = ctx.saved_tensors
    if saved_grad.dim() != 3:
        raise RuntimeError("masked_mse_loss was run with store_grad=False: it saved no gradient")
    if _is_traced(saved_grad):  # a functional graph: scale out of place, keep the saved buffer
        return (ctx.ops.masked_mse_loss_backward(grad_loss, saved_grad, mask_sum), *nothing)
    ctx.ops.masked_mse_loss_backward_(saved_grad, grad_loss, mask_sum)
    ctx.saved_grad_consumed = True
    return (saved_grad, *nothing)
