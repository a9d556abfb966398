"""The decoder input in one pass: visible tokens and mask tokens in the original patch order, plus positions.

Forward: out[b, 0] = x[b, 0] + pos[0]; out[b, 1 + l] = (x[b, 1 + r] if r < K else mask_token) + pos[1 + l]
with r = ids_restore[b, l] and K = x.shape[1] - 1 (what the release computes with cat + gather + add).
Values are added in fp32 and rounded once to x's dtype.

Backward: grad_x is a permutation of grad_out's rows (each program writes the rows of its image, so
ids_restore must be a permutation of 0..L-1 per row, as random_masking returns), and the mask-token
gradient is a deterministic two-stage sum: each program reduces the masked rows of one image into an
fp32 partial [B, Dd] (fixed order, no atomics), then the caller sums the B partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mae_fast.kernels._config import device_guard
from mae_fast.kernels.patchify_gather import new_output

BLOCK_ROWS = 8


@triton.jit
def _unshuffle_kernel(
    x_ptr, mask_ptr, ids_ptr, pos_ptr, out_ptr, num_visible, L, N,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """x [B, K+1, N], ids [B, L], pos [L+1, N], out [B, L+1, N], all contiguous; mask [N]."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_r = rows < L + 1
    in_n = offs_n < N
    restore = tl.load(ids_ptr + b * L + rows - 1, mask=in_r & (rows > 0), other=-1).to(tl.int64)
    is_mask = (rows > 0) & (restore >= num_visible)
    src = tl.where(rows == 0, 0, 1 + restore)
    tile = in_r[:, None] & in_n[None, :]
    values = tl.load(
        x_ptr + (b * (num_visible + 1) + src)[:, None] * N + offs_n[None, :], mask=tile & ~is_mask[:, None]
    )
    mask_token = tl.load(mask_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)
    values = tl.where(is_mask[:, None], mask_token[None, :], values.to(tl.float32))
    if HAS_POS:
        values += tl.load(pos_ptr + rows[:, None] * N + offs_n[None, :], mask=tile, other=0.0).to(tl.float32)
    out_rows = b * (L + 1) + rows
    tl.store(out_ptr + out_rows[:, None] * N + offs_n[None, :], values.to(out_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _unshuffle_backward_kernel(
    grad_ptr, ids_ptr, grad_x_ptr, partial_ptr, num_visible, L, N,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """grad [B, L+1, N] -> grad_x [B, K+1, N] (row moves) and partial[b] = sum of grad's masked rows (fp32)."""
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    masked_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, L + 1, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        in_r = rows < L + 1
        restore = tl.load(ids_ptr + b * L + rows - 1, mask=in_r & (rows > 0), other=-1).to(tl.int64)
        is_mask = (rows > 0) & (restore >= num_visible)
        tile = in_r[:, None] & in_n[None, :]
        g = tl.load(grad_ptr + (b * (L + 1) + rows)[:, None] * N + offs_n[None, :], mask=tile, other=0.0)
        dst = b * (num_visible + 1) + tl.where(rows == 0, 0, 1 + restore)
        tl.store(grad_x_ptr + dst[:, None] * N + offs_n[None, :], g, mask=tile & ~is_mask[:, None])
        masked_sum += tl.sum(tl.where(is_mask[:, None], g.to(tl.float32), 0.0), axis=0)
    tl.store(partial_ptr + b * N + offs_n, masked_sum, mask=in_n)


def block_n(dim: int) -> int:
    return min(128, triton.next_power_of_2(dim))


def forward(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor | None
) -> torch.Tensor:
    """x [B, K+1, Dd], mask_token with Dd values, ids_restore [B, L], pos_embed with (L+1)*Dd values or None
    -> [B, L+1, Dd] in x's dtype. Inputs pre-validated (ids in [0, L))."""
    b, k1, dim = x.shape
    length = ids_restore.shape[1]
    out = new_output((b, length + 1, dim), x.dtype, x.device)
    pos_arg = pos_embed.contiguous() if pos_embed is not None else x
    bn = block_n(dim)
    grid = (b, triton.cdiv(length + 1, BLOCK_ROWS), triton.cdiv(dim, bn))
    with device_guard(x):
        _unshuffle_kernel[grid](
            x.contiguous(), mask_token.contiguous(), ids_restore.contiguous(), pos_arg, out, k1 - 1, length, dim,
            HAS_POS=pos_embed is not None, BLOCK_R=BLOCK_ROWS, BLOCK_N=bn,
        )  # fmt: skip
    return out


def backward(grad_out: torch.Tensor, ids_restore: torch.Tensor, num_visible: int) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out [B, L+1, Dd] -> (grad_x [B, K+1, Dd] in grad_out's dtype, per-image mask-token partial sums
    [B, Dd] fp32). ids_restore [B, L] must be a permutation of 0..L-1 per row."""
    b, l1, dim = grad_out.shape
    grad_x = new_output((b, num_visible + 1, dim), grad_out.dtype, grad_out.device)
    partial = new_output((b, dim), torch.float32, grad_out.device)
    bn = block_n(dim)
    with device_guard(grad_out):
        _unshuffle_backward_kernel[(b, triton.cdiv(dim, bn))](
            grad_out.contiguous(), ids_restore.contiguous(), grad_x, partial, num_visible, l1 - 1, dim,
            BLOCK_R=BLOCK_ROWS, BLOCK_N=bn,
        )  # fmt: skip
    return grad_x, partial
