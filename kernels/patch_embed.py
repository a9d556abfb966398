"""Patch embedding of the visible patches only: one GEMM that gathers its A operand from the image.

Forward: out[b, k, :] = W @ patch(imgs[b], ids_keep[b, k]) + bias + pos_embed[ids_keep[b, k]], with
the patch flattened in the (c, i, j) order of the Conv2d weight [D, C, p, p] (used in place as
[D, C*p*p]). The A tile is loaded straight from the NCHW image: no patchified copy, no conv over the
hidden patches. Accumulation is fp32 (tl.dot on tensor cores for fp16/bf16; fp32 inputs use IEEE
fp32 so the result matches torch's default fp32 matmul, which does not use TF32).

The gradient of pos_embed is a deterministic reduction over the batch (ids within a row are distinct,
rows share positions): each program owns a block of table rows and loops over the batch, reading the
grad row that the inverse map of ids_keep names, so no atomics are needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mae_fast.kernels._config import UPCAST_BF16, device_guard
from mae_fast.kernels.patchify_gather import new_output

BLOCK_M = 64
NUM_WARPS = 8
NUM_STAGES = 3


def block_k(dtype: torch.dtype) -> int:
    """Reduction step: 32 for the fp16/bf16 tensor-core dot; 16 for fp32, whose IEEE FMA dot needs more
    registers (at 32 it spills on sm_80, see the AOT report of tests/ops/test_patch_embed.py)."""
    return 16 if dtype == torch.float32 else 32


@triton.jit
def _patch_embed_kernel(
    imgs_ptr, ids_ptr, w_ptr, bias_ptr, pos_ptr, out_ptr,
    M, N, num_visible, grid_w,
    stride_b, stride_c, stride_h, stride_w,
    P: tl.constexpr, C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out [M = B*K, N = D] contiguous; w [N, P*P*C] contiguous; pos [L, N] contiguous."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m < M
    in_n = offs_n < N
    patch = tl.load(ids_ptr + offs_m, mask=in_m, other=0).to(tl.int64)
    b = (offs_m // num_visible).to(tl.int64)
    row_off = b * stride_b + (patch // grid_w) * P * stride_h + (patch % grid_w) * P * stride_w
    E: tl.constexpr = P * P * C
    # bias and position rows seed the accumulator: loaded before the loop, they hold no extra registers
    # in the epilogue (added after the loop, the position gather costs ~100 registers on sm_90)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        pos = tl.load(pos_ptr + patch[:, None] * N + offs_n[None, :], mask=in_m[:, None] & in_n[None, :], other=0.0)
        acc += pos.to(tl.float32)
    for e0 in range(0, E, BLOCK_K):
        offs_e = e0 + tl.arange(0, BLOCK_K)
        in_e = offs_e < E
        col_off = (offs_e // (P * P)) * stride_c + ((offs_e // P) % P) * stride_h + (offs_e % P) * stride_w
        a = tl.load(imgs_ptr + row_off[:, None] + col_off[None, :], mask=in_m[:, None] & in_e[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * E + offs_e[:, None], mask=in_e[:, None] & in_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    out_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _pos_grad_kernel(
    grad_ptr, inv_ptr, out_ptr, batch, num_visible, L, N,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out[l, n] = sum_b grad[b, inv[b, l], n] over the b where inv[b, l] >= 0; fp32, fixed order."""
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_l = offs_l < L
    in_n = offs_n < N
    acc = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
    for b in range(0, batch):
        k = tl.load(inv_ptr + b * L + offs_l, mask=in_l, other=-1)
        kept = k >= 0
        row = (b * num_visible + k).to(tl.int64)
        g = tl.load(grad_ptr + row[:, None] * N + offs_n[None, :], mask=kept[:, None] & in_n[None, :], other=0.0)
        acc += g.to(tl.float32)
    tl.store(out_ptr + offs_l[:, None] * N + offs_n[None, :], acc, mask=in_l[:, None] & in_n[None, :])


def block_n(dim: int) -> int:
    return min(128, max(16, triton.next_power_of_2(dim)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: IEEE fp32 products (torch's default matmul); half types: the tensor-core path."""
    return "ieee" if dtype == torch.float32 else "tf32"


def forward(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
) -> torch.Tensor:
    """imgs [B, C, H, W] (any strides), ids_keep [B, K], weight [D, C, p, p] (imgs' dtype), bias [D] or None,
    pos_embed with L*D values (patch rows) or None -> [B, K, D] in imgs' dtype. Inputs pre-validated."""
    b, c, _, w = imgs.shape
    dim, _, p, _ = weight.shape
    k = ids_keep.shape[1]
    out = new_output((b, k, dim), imgs.dtype, imgs.device)
    if out.numel() == 0:
        return out
    m = b * k
    ids = ids_keep.contiguous()
    wt = weight.contiguous()
    bias_arg = bias.contiguous() if bias is not None else wt
    pos_arg = pos_embed.contiguous() if pos_embed is not None else wt
    bn = block_n(dim)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(dim, bn))
    with device_guard(imgs):
        _patch_embed_kernel[grid](
            imgs, ids, wt, bias_arg, pos_arg, out, m, dim, k, w // p, *imgs.stride(),
            P=p, C=c, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
            UPCAST=UPCAST_BF16 and imgs.dtype == torch.bfloat16, PRECISION=dot_precision(imgs.dtype),
            BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=block_k(imgs.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )  # fmt: skip
    return out


def pos_embed_grad(grad_out: torch.Tensor, ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """grad_out [B, K, D], ids_keep [B, K] (distinct ids per row) -> [L, D] fp32: the sum over the batch
    of grad_out scattered to the table rows ids_keep names. Deterministic (no atomics)."""
    b, k, dim = grad_out.shape
    inverse = torch.full((b, num_patches), -1, dtype=torch.int32, device=grad_out.device)
    positions = torch.arange(k, dtype=torch.int32, device=grad_out.device).expand(b, k)
    inverse.scatter_(1, ids_keep.long(), positions)
    out = new_output((num_patches, dim), torch.float32, grad_out.device)
    block_l, bn = 16, block_n(dim)
    grid = (triton.cdiv(num_patches, block_l), triton.cdiv(dim, bn))
    with device_guard(grad_out):
        _pos_grad_kernel[grid](grad_out.contiguous(), inverse, out, b, k, num_patches, dim, BLOCK_L=block_l, BLOCK_N=bn)
    return out
