"""masked_mse_loss in Triton: the MAE loss and the gradient of pred in one pass over pred and the image.

Forward (three launches):
- a one-program launch sums the mask [B, L] in a fixed order (deterministic), so the main launch knows
  ``mask_sum`` before it writes anything;
- the main launch gives each program BLOCK_M patches of pred [B, L, p*p*C] and reads their target
  pixels straight from the NCHW image (no patchified copy), normalises them per patch (mean, UNBIASED
  variance) when ``norm_pix`` and accumulates in fp32 whatever the input dtypes. It stores ONE partial
  sum of ``mask * per_patch_mse`` per program (no atomics) and, when pred needs a gradient, the saved
  gradient [B, L, p*p*C] (contiguous, pred's dtype) for every patch: for float32 and bfloat16 pred the
  FINAL gradient for an upstream gradient of 1, ``mask * (pred - target) * 2 / (p*p*C * mask_sum)``
  computed in fp32 and rounded once;
- a one-program launch adds the partials in a fixed order and writes loss = sum / mask_sum.
Patches whose mask is 0 are not read at all (their gradient is 0), so the forward reads pred and the
pixels of the removed patches only. Unlike the reference, a non-finite value in a kept patch
(mask == 0) therefore does not turn the loss into NaN. A loss computed under no_grad (or of a pred
that does not require grad) stores no gradient at all (``store_grad``).

float16 pred is the exception (the ``PRESCALE`` constexpr is off): 2 / (p*p*C * mask_sum) is ~7e-8
for ViT-B at batch 256 (768 values, 37,632 removed patches), below float16's smallest normal (6e-5)
and at its smallest subnormal, so a gradient pre-scaled for an upstream gradient of 1 would lose its
bits or flush to 0 in the forward, before a GradScaler's factor (the reason fp16 training uses one)
can lift it back into range. For float16 the forward therefore stores the O(1) residual
``mask * (pred - target)`` and the backward applies 2 * grad_loss / (p*p*C * mask_sum) in fp32; that
gradient is rounded twice (the residual, then the product), within one ulp of the exact one.

Backward (eager): ONE launch scales the saved gradient IN PLACE by the upstream gradient (fp16: by
2 * grad_loss / (p*p*C * mask_sum)) and hands that very buffer out as the gradient of pred. Its
programs read the upstream gradient from device memory (no host sync) and return at once when the
factor is exactly 1 (x * 1 == x): a plain ``loss.backward()`` reads 4 bytes per program and writes
nothing. The grid is a few programs per SM that loop over the buffer, so that no-op launches few
programs. A loss scaled by 1 / accum_steps or a GradScaler factor costs one read and one write of the
buffer, and gradients stay within one ulp (rounded in the forward, then after the scaling). Because the
buffer is consumed, a second backward through the same graph (``retain_graph=True``) raises a
RuntimeError; backend="reference" supports it. Under torch.compile the backward scales out of place
(``masked_mse_loss_backward``), so the traced graph stays functional and its saved buffer intact.

Traffic at ViT-B/16, batch 256, bf16 pred, fp32 images, mask ratio 0.75 (computed from the sizes,
not measured): the forward reads 57.8 MB of pred (the 147 removed patches of 196 per image),
115.6 MB of pixels and the 0.2 MB mask twice, writes the 77.1 MB gradient (zeros for kept patches)
and 0.2 MB of partials: ~251 MB. The backward moves nothing for an upstream gradient of 1 (a few KB
of scalar reads), else 154 MB (it reads and writes the gradient). Fwd+bwd: ~251 MB, against the
~270 MB that docs/performance.md budgets (it counts all of pred); the earlier design (an O(1) residual for
every dtype, scaled out of place by a second pass) moved ~405 MB. float16 pred always pays the
154 MB backward.

The image is a constant of the loss in MAE (it never requires grad), so this op gives no gradient for
``imgs`` or ``mask``; the dispatcher's check sends such calls to the reference backend.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from mae_fast.kernels._config import TL_DTYPES, UPCAST_BF16, device_guard

# Values per forward program (BLOCK_M patches of BLOCK_N values). The image side is a gather (channel-last
# values from NCHW), one address per value: 1024 keeps sm_90 at ~30 registers for p = 16 and 14.
_TILE = 1024
# Values per loop step of the one-program mask sum (ViT-B at batch 256: 13 steps) and of the finalize.
_MASK_SUM_BLOCK = 4096
_FINALIZE_BLOCK = 1024
# Backward: values per loop step of one program (8 warps: 16 values, two 16-byte bf16 vectors, per
# thread) and programs per SM (each loops over the buffer). Chosen, not yet timed on a GPU.
_SCALE_BLOCK = 4096
_SCALE_PROGRAMS_PER_SM = 4


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
def _mask_sum_kernel(mask_ptr, mask_sum_ptr, num_rows, num_patches, stride_mb, stride_ml, BLOCK: tl.constexpr):
    """mask_sum = the sum of mask [B, L] in fp32, by one program in a fixed order (deterministic)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        offsets = (rows // num_patches) * stride_mb + (rows % num_patches) * stride_ml
        acc += tl.load(mask_ptr + offsets, mask=rows < num_rows, other=0.0).to(tl.float32)
    tl.store(mask_sum_ptr, tl.sum(acc, axis=0))


@triton.jit
def _masked_mse_forward_kernel(
    pred_ptr,
    imgs_ptr,
    mask_ptr,
    mask_sum_ptr,
    grad_ptr,
    partial_ptr,  # [num_programs] fp32: the sums of mask * per-patch MSE
    num_rows,  # B * L
    num_patches,  # L
    grid_w,
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
    STORE_GRAD: tl.constexpr,
    PRESCALE: tl.constexpr,  # store the gradient for grad_loss 1; off (fp16): the residual mask * (pred - target)
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
    if STORE_GRAD:
        if PRESCALE:
            row_scale = weight * (2.0 / (N * tl.load(mask_sum_ptr)))
        else:
            row_scale = weight
        grad = _round_to_bf16(diff * row_scale[:, None], ROUND_BF16)
        tl.store(
            grad_ptr + rows[:, None] * N + n[None, :],
            grad.to(grad_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )
    tl.store(partial_ptr + pid, tl.sum(per_patch * weight, axis=0))


@triton.jit
def _masked_mse_finalize_kernel(partial_ptr, mask_sum_ptr, loss_ptr, num_programs, BLOCK: tl.constexpr):
    """loss = sum(partials) / mask_sum, the partials summed in a fixed order by one program."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_programs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < num_programs, other=0.0)
    tl.store(loss_ptr, tl.sum(acc, axis=0) / tl.load(mask_sum_ptr))


@triton.jit
def _scale_blocks(src_ptr, dst_ptr, scale, numel, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    """dst = src * scale (fp32 math, one rounding), blocks pid, pid + num_programs, ... of this program."""
    first = tl.program_id(0).to(tl.int64) * BLOCK
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(first, numel, step):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < numel
        values = _round_to_bf16(tl.load(src_ptr + offs, mask=ok, other=0.0).to(tl.float32) * scale, ROUND_BF16)
        tl.store(dst_ptr + offs, values.to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scale_grad_kernel(
    saved_ptr,
    grad_ptr,
    grad_loss_ptr,
    mask_sum_ptr,
    numel,
    N: tl.constexpr,
    FROM_RESIDUAL: tl.constexpr,
    SKIP_UNIT_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """grad = saved * grad_loss, or from an fp16 residual saved * 2 * grad_loss / (N * mask_sum).

    With SKIP_UNIT_SCALE (in place: saved_ptr == grad_ptr) a program whose factor is exactly 1 returns
    without touching memory, since the buffer already holds the result.
    """
    scale = tl.load(grad_loss_ptr).to(tl.float32)
    if FROM_RESIDUAL:
        scale = 2.0 * scale / (N * tl.load(mask_sum_ptr))
    if SKIP_UNIT_SCALE:
        if scale != 1.0:
            _scale_blocks(saved_ptr, grad_ptr, scale, numel, BLOCK, ROUND_BF16)
    else:
        _scale_blocks(saved_ptr, grad_ptr, scale, numel, BLOCK, ROUND_BF16)


def forward_config(patch_values: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward for patches of ``patch_values`` = p*p*C values."""
    block_n = triton.next_power_of_2(patch_values)
    block_m = max(1, min(128, _TILE // block_n))
    num_warps = min(16, max(4, block_m * block_n // 256))
    return block_m, block_n, num_warps


def saves_residual(dtype: torch.dtype) -> bool:
    """Whether the forward saves the O(1) residual rather than the final gradient (float16: see above)."""
    return dtype == torch.float16


def _rounds_bf16(out: torch.Tensor) -> bool:
    return UPCAST_BF16 and out.dtype == torch.bfloat16


def _float_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype in TL_DTYPES else mask.to(torch.float32)


def _saved_grad_shape(pred: torch.Tensor, store_grad: bool) -> tuple[int, ...]:
    return tuple(pred.shape) if store_grad else (0,)


def forward_buffers(pred: torch.Tensor, store_grad: bool = True) -> dict[str, torch.Tensor]:
    """Uninitialised outputs of :func:`forward_into` for ``pred`` [B, L, p*p*C] (tests poison them).

    saved_grad is [B, L, p*p*C] in pred's dtype, or an empty [0] tensor without ``store_grad``.
    """
    b, length, values = pred.shape
    block_m = forward_config(values)[0]
    programs = max(1, triton.cdiv(b * length, block_m))
    return {
        "loss": pred.new_empty((), dtype=torch.float32),
        "saved_grad": torch.empty(_saved_grad_shape(pred, store_grad), device=pred.device, dtype=pred.dtype),
        "mask_sum": pred.new_empty((), dtype=torch.float32),
        "partials": pred.new_empty(programs, dtype=torch.float32),
    }


def forward_into(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool,
    eps: float,
    loss: torch.Tensor,
    saved_grad: torch.Tensor,
    mask_sum: torch.Tensor,
    partials: torch.Tensor,
) -> None:
    """Run the forward into buffers from :func:`forward_buffers`; inputs as validated by ops.masked_mse_loss.

    pred [B, L, p*p*C] and imgs [B, C, H, W] in float32/float16/bfloat16 with any strides, mask [B, L]
    of any real dtype. Writes loss (0-d fp32), mask_sum (0-d fp32) and, when it has pred's shape,
    saved_grad [B, L, p*p*C] (contiguous, pred's dtype): the gradient of pred for an upstream gradient
    of 1, or for float16 pred the residual mask * (pred - target).
    """
    b, length, values = pred.shape
    channels, grid_w = imgs.shape[1], imgs.shape[3] // patch_size
    mask = _float_mask(mask)
    block_m, block_n, num_warps = forward_config(values)
    programs = partials.shape[0]
    with device_guard(pred):
        _mask_sum_kernel[(1,)](mask, mask_sum, b * length, length, *mask.stride(), BLOCK=_MASK_SUM_BLOCK, num_warps=8)
        _masked_mse_forward_kernel[(programs,)](
            pred,
            imgs,
            mask,
            mask_sum,
            saved_grad,
            partials,
            b * length,
            length,
            grid_w,
            *pred.stride(),
            *imgs.stride(),
            *mask.stride(),
            eps,
            P=patch_size,
            C=channels,
            NORM_PIX=norm_pix,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            STORE_GRAD=saved_grad.shape == pred.shape,
            PRESCALE=not saves_residual(pred.dtype),
            ROUND_BF16=_rounds_bf16(saved_grad),
            num_warps=num_warps,
        )
        _masked_mse_finalize_kernel[(1,)](partials, mask_sum, loss, programs, BLOCK=_FINALIZE_BLOCK, num_warps=4)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU; 1 for the CPU (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _scale_programs(numel: int, device: torch.device) -> int:
    """Programs of the backward's grid: a few per SM, each looping over the buffer, never more than its blocks."""
    return max(1, min(triton.cdiv(numel, _SCALE_BLOCK), _SCALE_PROGRAMS_PER_SM * _sm_count(device)))


def _launch_scale(saved_grad, grad_loss, mask_sum, grad_pred, skip_unit_scale: bool) -> None:
    numel = saved_grad.numel()
    if numel == 0:
        return
    with device_guard(saved_grad):
        _scale_grad_kernel[(_scale_programs(numel, saved_grad.device),)](
            saved_grad,
            grad_pred,
            grad_loss,
            mask_sum,
            numel,
            N=saved_grad.shape[-1],
            FROM_RESIDUAL=saves_residual(saved_grad.dtype),
            SKIP_UNIT_SCALE=skip_unit_scale,
            BLOCK=_SCALE_BLOCK,
            ROUND_BF16=_rounds_bf16(grad_pred),
            num_warps=8,
        )


def scale_grad_(saved_grad: torch.Tensor, grad_loss: torch.Tensor, mask_sum: torch.Tensor) -> None:
    """Turn the forward's saved_grad into the gradient of grad_loss * loss in place; nothing moves for 1."""
    _launch_scale(saved_grad, grad_loss, mask_sum, saved_grad, skip_unit_scale=True)


def scale_grad_into(
    saved_grad: torch.Tensor, grad_loss: torch.Tensor, mask_sum: torch.Tensor, grad_pred: torch.Tensor
) -> None:
    """grad_pred (contiguous, saved_grad's shape and dtype, another tensor) = the gradient of grad_loss * loss.

    saved_grad, grad_loss (0-d) and mask_sum (0-d fp32) as :func:`forward_into` and autograd give them;
    saved_grad is only read.
    """
    _launch_scale(saved_grad, grad_loss, mask_sum, grad_pred, skip_unit_scale=False)
