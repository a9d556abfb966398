"""random_masking in Triton: noise [B, L] -> (ids_keep, ids_restore, mask) in one launch, no sort.

The position of patch l in the ascending stable order of its row is its rank

    rank[l] = #{m : noise[m] < noise[l]  or  (noise[m] == noise[l] and m < l)}

so ids_restore = rank, mask = (rank >= K) and ids_keep[rank[l]] = l for rank[l] < K: exactly what the
release's ``argsort(argsort(noise))`` gives with a stable sort (ties go to the lower patch index).
NaN follows torch's sort: it is larger than every number (+inf included) and NaNs tie with each
other, so NaN patches are removed first. (ops.random_masking rejects NaN noise where it can check
without a device sync; on a GPU the kernel applies this rule.) -0.0 and +0.0 tie.

Grid (B, cdiv(L, BLOCK_L)): each program ranks BLOCK_L patches of one row against the whole row,
BLOCK_M columns at a time, so any L works and a small batch still fills the GPU. The programs are
independent: ranks are a permutation, so the scatter into ids_keep never writes one element twice.
fp16/bf16/fp32 noise is compared in fp32 (exact, order preserving), float64 in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from mae_fast.kernels._config import device_guard

BLOCK_L = 16  # with BLOCK_M = 128: 40 registers on sm_90, no spills
BLOCK_M = 128


@triton.jit
def _random_masking_kernel(
    noise_ptr,
    ids_keep_ptr,
    ids_restore_ptr,
    mask_ptr,
    length,
    len_keep,
    stride_nb,
    stride_nl,
    FLOAT64: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    patch = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    patch_ok = patch < length
    row_noise = noise_ptr + row * stride_nb

    key = tl.load(row_noise + patch * stride_nl, mask=patch_ok, other=0.0)
    if not FLOAT64:
        key = key.to(tl.float32)
    key_nan = key != key

    rank = tl.zeros([BLOCK_L], dtype=tl.int32)
    for start in range(0, length, BLOCK_M):
        other = start + tl.arange(0, BLOCK_M)
        other_ok = other < length
        value = tl.load(row_noise + other * stride_nl, mask=other_ok, other=0.0)
        if not FLOAT64:
            value = value.to(tl.float32)
        value_nan = value != value
        # other comes first in the stable order: smaller, or equal with a lower index (NaN above all)
        smaller = (value[None, :] < key[:, None]) | (key_nan[:, None] & ~value_nan[None, :])
        equal = (value[None, :] == key[:, None]) | (key_nan[:, None] & value_nan[None, :])
        before = (smaller | (equal & (other[None, :] < patch[:, None]))) & other_ok[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)

    tl.store(ids_restore_ptr + row * length + patch, rank.to(tl.int64), mask=patch_ok)
    tl.store(mask_ptr + row * length + patch, (rank >= len_keep).to(tl.float32), mask=patch_ok)
    tl.store(ids_keep_ptr + row * len_keep + rank, patch.to(tl.int64), mask=patch_ok & (rank < len_keep))


def random_masking_into(
    noise: torch.Tensor, len_keep: int, ids_keep: torch.Tensor, ids_restore: torch.Tensor, mask: torch.Tensor
) -> None:
    """Fill contiguous ids_keep [B, K] int64, ids_restore [B, L] int64 and mask [B, L] float32 from noise [B, L].

    noise is float16/bfloat16/float32/float64 with any strides; 1 <= len_keep <= L (checked by the op).
    """
    batch, length = noise.shape
    grid = (batch, triton.cdiv(length, BLOCK_L))
    with device_guard(noise):
        _random_masking_kernel[grid](
            noise,
            ids_keep,
            ids_restore,
            mask,
            length,
            len_keep,
            *noise.stride(),
            FLOAT64=noise.dtype == torch.float64,
            BLOCK_L=BLOCK_L,
            BLOCK_M=BLOCK_M,
            num_warps=4,
        )


def _outputs(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, length = noise.shape
    return (
        torch.empty(batch, len_keep, device=noise.device, dtype=torch.int64),
        torch.empty(batch, length, device=noise.device, dtype=torch.int64),
        torch.empty(batch, length, device=noise.device, dtype=torch.float32),
    )


def random_masking(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """noise [B, L] -> (ids_keep [B, K] int64, ids_restore [B, L] int64, mask [B, L] float32, 1 = removed)."""
    outputs = _outputs(noise, len_keep)
    random_masking_into(noise, len_keep, *outputs)
    return outputs
