"""masked_mse_loss in Triton: the MAE loss and the gradient of pred in one pass over pred and the image.

Forward (one launch over the patches, then one tiny launch):
- each program takes BLOCK_M patches of pred [B, L, p*p*C] and reads their target pixels straight from
  the NCHW image (no patchified copy), normalises them per patch (mean, UNBIASED variance) when
  ``norm_pix``, and accumulates in fp32 whatever the input dtypes;
- it stores the weighted residual ``mask[b, l] * (pred - target)`` in pred's dtype, and ONE partial sum
  of ``mask * per_patch_mse`` and one of ``mask`` per program (no atomics);
- a one-program launch adds the partials in a fixed order (deterministic: the same inputs give the same
  bits run after run) and writes the loss and the mask sum.
The residual is written only when pred needs a gradient (``store_residual``): a loss computed under
no_grad writes nothing but the partials. Patches whose mask is 0 are not read at all (their residual
is 0), so a forward reads pred and the pixels of the removed patches only. Unlike the reference, a
non-finite value in a kept patch (mask == 0) therefore does not turn the loss into NaN.

Backward: grad_pred = residual * (2 * grad_loss / (p*p*C * mask_sum)), one elementwise launch that
reads the stored residual and never pred or the image again. The residual is O(1) (the 2 / (N * sum)
factor is applied in the backward), so it does not underflow in fp16 before scaling; the gradient is
the residual rounded to pred's dtype, then scaled and rounded again (within one ulp of the exact one).

The image is a constant of the loss in MAE (it never requires grad), so this op gives no gradient for
``imgs`` or ``mask``; the dispatcher's check sends such calls to the reference backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mae_fast.kernels._config import TL_DTYPES, UPCAST_BF16, device_guard

#: Largest patch (p*p*C values) one program holds in registers; larger patches use the reference.
MAX_PATCH_VALUES = 8192
# Values per forward program (BLOCK_M patches of BLOCK_N values). The image side is a gather (channel-last
# values from NCHW), one address per value: 1024 keeps sm_90 at ~30 registers for p = 16 and 14.
_TILE = 1024
_FINALIZE_BLOCK = 1024
_BACKWARD_BLOCK = 2048


@triton.jit
def _round_to_bf16(x, ROUND_BF16: tl.constexpr):
    """x (fp32) rounded to the nearest bfloat16 (ties to even) when ROUND_BF16 (a bf16 store, interpreting).

    The interpreter truncates fp32 -> bf16 stores; the GPU rounds. Rounding the bits first makes the
    interpreter's truncation exact, so both store the same value.
    """
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _masked_mse_forward_kernel(
    pred_ptr,
    imgs_ptr,
    mask_ptr,
    residual_ptr,
    partial_ptr,  # [2, num_programs] fp32: row 0 the sums of mask * per-patch MSE, row 1 the mask sums
    num_rows,  # B * L
    num_patches,  # L
    grid_w,
    num_programs,
    stride_pb,
    stride_pl,
    stride_pn,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_mb,
    stride_ml,
    eps,
    P: tl.constexpr,
    C: tl.constexpr,
    NORM_PIX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_RESIDUAL: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    N: tl.constexpr = P * P * C
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    b = rows // num_patches
    patch = rows % num_patches

    # value n of a patch is pixel (i, j) of channel c with n = (i * P + j) * C + c; offsets split into a
    # per-patch int64 base and a per-value int32 offset
    n = tl.arange(0, BLOCK_N)
    col_ok = n < N
    pix_offset = (n % C) * stride_ic + (n // (P * C)) * stride_ih + ((n // C) % P) * stride_iw
    pix_base = b * stride_ib + (patch // grid_w) * P * stride_ih + (patch % grid_w) * P * stride_iw

    weight = tl.load(mask_ptr + b * stride_mb + patch * stride_ml, mask=row_ok, other=0.0).to(tl.float32)
    active = row_ok & (weight != 0.0)
    load_mask = active[:, None] & col_ok[None, :]

    target = tl.load(imgs_ptr + pix_base[:, None] + pix_offset[None, :], mask=load_mask, other=0.0).to(tl.float32)
    pred_base = b * stride_pb + patch * stride_pl
    pred = tl.load(pred_ptr + pred_base[:, None] + (n * stride_pn)[None, :], mask=load_mask, other=0.0)
    pred = pred.to(tl.float32)

    if NORM_PIX:
        mean = tl.sum(target, axis=1) / N
        centred = tl.where(col_ok[None, :], target - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / (N - 1)  # unbiased, as the release
        target = centred / tl.sqrt(var + eps)[:, None]

    diff = tl.where(load_mask, pred - target, 0.0)
    per_patch = tl.sum(diff * diff, axis=1) / N
    if STORE_RESIDUAL:
        residual = _round_to_bf16(diff * weight[:, None], ROUND_BF16)
        tl.store(
            residual_ptr + rows[:, None] * N + n[None, :],
            residual.to(residual_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )
    tl.store(partial_ptr + pid, tl.sum(per_patch * weight, axis=0))
    tl.store(partial_ptr + num_programs + pid, tl.sum(weight, axis=0))


@triton.jit
def _masked_mse_finalize_kernel(partial_ptr, loss_ptr, mask_sum_ptr, num_programs, BLOCK: tl.constexpr):
    """loss = sum(partial loss) / sum(partial mask), both summed in a fixed order by one program."""
    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    mask_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_programs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < num_programs
        loss_acc += tl.load(partial_ptr + offs, mask=ok, other=0.0)
        mask_acc += tl.load(partial_ptr + num_programs + offs, mask=ok, other=0.0)
    mask_sum = tl.sum(mask_acc, axis=0)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / mask_sum)
    tl.store(mask_sum_ptr, mask_sum)


@triton.jit
def _masked_mse_backward_kernel(
    residual_ptr,
    grad_loss_ptr,
    mask_sum_ptr,
    grad_pred_ptr,
    numel,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """grad_pred = residual * 2 * grad_loss / (N * mask_sum), fp32 math, one rounding to pred's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    scale = 2.0 * tl.load(grad_loss_ptr).to(tl.float32) / (N * tl.load(mask_sum_ptr))
    grad = tl.load(residual_ptr + offs, mask=ok, other=0.0).to(tl.float32) * scale
    grad = _round_to_bf16(grad, ROUND_BF16)
    tl.store(grad_pred_ptr + offs, grad.to(grad_pred_ptr.dtype.element_ty), mask=ok)


def forward_config(patch_values: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward for patches of ``patch_values`` = p*p*C values."""
    block_n = triton.next_power_of_2(patch_values)
    block_m = max(1, min(128, _TILE // block_n))
    num_warps = min(16, max(4, block_m * block_n // 256))
    return block_m, block_n, num_warps


def _rounds_bf16(out: torch.Tensor) -> bool:
    return UPCAST_BF16 and out.dtype == torch.bfloat16


def _float_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype in TL_DTYPES else mask.to(torch.float32)


def _residual_shape(pred: torch.Tensor, store_residual: bool) -> tuple[int, ...]:
    return tuple(pred.shape) if store_residual else (0,)


def forward_buffers(pred: torch.Tensor, store_residual: bool = True) -> dict[str, torch.Tensor]:
    """Uninitialised outputs of :func:`forward_into` for ``pred`` [B, L, p*p*C] (tests poison them).

    The residual is [B, L, p*p*C] in pred's dtype, or an empty [0] tensor without ``store_residual``.
    """
    b, length, values = pred.shape
    block_m = forward_config(values)[0]
    programs = max(1, triton.cdiv(b * length, block_m))
    return {
        "loss": pred.new_empty((), dtype=torch.float32),
        "residual": torch.empty(_residual_shape(pred, store_residual), device=pred.device, dtype=pred.dtype),
        "mask_sum": pred.new_empty((), dtype=torch.float32),
        "partials": pred.new_empty(2, programs, dtype=torch.float32),
    }


def forward_into(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool,
    eps: float,
    loss: torch.Tensor,
    residual: torch.Tensor,
    mask_sum: torch.Tensor,
    partials: torch.Tensor,
) -> None:
    """Run the forward into buffers from :func:`forward_buffers`; inputs as validated by ops.masked_mse_loss.

    pred [B, L, p*p*C] and imgs [B, C, H, W] in float32/float16/bfloat16 with any strides, mask [B, L]
    of any real dtype. Writes loss (0-d fp32), mask_sum (0-d fp32) and, when it has pred's shape, the
    residual [B, L, p*p*C] (contiguous, pred's dtype).
    """
    b, length, values = pred.shape
    channels, grid_w = imgs.shape[1], imgs.shape[3] // patch_size
    mask = _float_mask(mask)
    block_m, block_n, num_warps = forward_config(values)
    programs = partials.shape[1]
    with device_guard(pred):
        _masked_mse_forward_kernel[(programs,)](
            pred,
            imgs,
            mask,
            residual,
            partials,
            b * length,
            length,
            grid_w,
            programs,
            *pred.stride(),
            *imgs.stride(),
            *mask.stride(),
            eps,
            P=patch_size,
            C=channels,
            NORM_PIX=norm_pix,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            STORE_RESIDUAL=residual.shape == pred.shape,
            ROUND_BF16=_rounds_bf16(residual),
            num_warps=num_warps,
        )
        _masked_mse_finalize_kernel[(1,)](partials, loss, mask_sum, programs, BLOCK=_FINALIZE_BLOCK, num_warps=4)


def backward_into(grad_loss: torch.Tensor, residual: torch.Tensor, mask_sum: torch.Tensor, grad_pred: torch.Tensor):
    """grad_pred (contiguous, residual's shape and dtype) = residual * 2 * grad_loss / (p*p*C * mask_sum)."""
    numel = residual.numel()
    if numel == 0:
        return
    with device_guard(residual):
        _masked_mse_backward_kernel[(triton.cdiv(numel, _BACKWARD_BLOCK),)](
            residual,
            grad_loss,
            mask_sum,
            grad_pred,
            numel,
            N=residual.shape[-1],
            BLOCK=_BACKWARD_BLOCK,
            ROUND_BF16=_rounds_bf16(grad_pred),
            num_warps=4,
        )


# --- torch.library custom ops (traceable by torch.compile) and their autograd ----------------------


@torch.library.custom_op("mae_fast_triton::masked_mse_loss", mutates_args=())
def masked_mse_loss_forward(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool,
    eps: float,
    store_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss 0-d fp32, residual [B, L, p*p*C] in pred's dtype or [0], mask_sum 0-d fp32)."""
    buffers = forward_buffers(pred, store_residual)
    forward_into(pred, imgs, mask, patch_size, norm_pix, eps, **buffers)
    return buffers["loss"], buffers["residual"], buffers["mask_sum"]


@masked_mse_loss_forward.register_fake
def _(pred, imgs, mask, patch_size, norm_pix, eps, store_residual):
    residual = pred.new_empty(_residual_shape(pred, store_residual))
    return pred.new_empty((), dtype=torch.float32), residual, pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("mae_fast_triton::masked_mse_loss_backward", mutates_args=())
def masked_mse_loss_backward(grad_loss: torch.Tensor, residual: torch.Tensor, mask_sum: torch.Tensor) -> torch.Tensor:
    """grad_pred [B, L, p*p*C] in the residual's dtype."""
    grad_pred = torch.empty_like(residual, memory_format=torch.contiguous_format)
    backward_into(grad_loss, residual, mask_sum, grad_pred)
    return grad_pred


@masked_mse_loss_backward.register_fake
def _(grad_loss, residual, mask_sum):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, residual, mask_sum = output
    ctx.save_for_backward(residual, mask_sum)
    ctx.mark_non_differentiable(residual, mask_sum)


def _backward(ctx, grad_loss, grad_residual, grad_mask_sum):
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError(
            "mae_fast_triton::masked_mse_loss gives no gradient for imgs or mask (the MAE target is a "
            "constant); use backend='reference' to differentiate them"
        )
    residual, mask_sum = ctx.saved_tensors
    if ctx.needs_input_grad[0] and residual.dim() != 3:
        raise RuntimeError("mae_fast_triton::masked_mse_loss was run with store_residual=False: no gradient")
    grad_pred = masked_mse_loss_backward(grad_loss, residual, mask_sum) if ctx.needs_input_grad[0] else None
    return grad_pred, None, None, None, None, None, None


masked_mse_loss_forward.register_autograd(_backward, setup_context=_setup_context)


def masked_mse_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """0-d fp32 loss of ops.masked_mse_loss (inputs validated there); differentiable w.r.t. pred only."""
    store_residual = pred.requires_grad and torch.is_grad_enabled()
    return masked_mse_loss_forward(pred, imgs, mask, patch_size, norm_pix, eps, store_residual)[0]
