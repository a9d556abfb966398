"""Shapes, dtypes and accuracy criteria shared by the CUDA kernel tests: tests/test_cuda_ops.py (on a GPU,
through the dispatcher) and tests/test_cuda_emulated.py (the same kernels under the CPU emulation)."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Tolerance of a value of order 1 computed in each dtype (a few ulps), for ops that round once or twice.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

GATHER_SHAPES = [  # (B, C, H, W, p, K): vector paths (p % 4 == 0, C in 1/3/4) and scalar ones
    (2, 3, 32, 32, 8, 5),
    (3, 1, 28, 28, 7, 4),
    (2, 3, 16, 24, 4, 6),
    (1, 4, 16, 16, 8, 4),
    (2, 2, 12, 12, 6, 3),
    (2, 3, 64, 48, 16, 12),
    # the grid of tests/test_triton_gather_ops.py
    (1, 1, 8, 8, 8, 1),
    (2, 3, 28, 42, 14, 6),
    (3, 3, 16, 40, 4, 7),
    (2, 1, 24, 16, 8, 1),
    (1, 20, 8, 8, 4, 2),
]

LOSS_SHAPES = [  # (B, C, H, W, p); the last five are the grid of tests/test_triton_masked_mse.py
    (2, 3, 32, 32, 8),
    (3, 1, 28, 28, 7),
    (2, 3, 32, 48, 16),
    (2, 3, 28, 28, 14),
    (1, 3, 14, 28, 14),
    (2, 1, 24, 16, 8),
    (2, 3, 12, 20, 4),
    (3, 3, 40, 56, 8),
    (1, 3, 32, 48, 16),
]


def low_precision_attention(q, k, v, scale):
    """Attention computed in q's dtype by PyTorch: the error budget a same-precision kernel may have."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.einsum("bhnm,bmhd->bnhd", probs, v)


def check_close_to_fp32(mine, low, ref, what):
    """FlashAttention's criterion: error vs the fp32 reference at most 2x that of PyTorch in the same dtype."""
    err = (mine.double() - ref.double()).abs().max().item()
    budget = (low.double() - ref.double()).abs().max().item()
    assert err <= 2 * budget + 1e-4, f"{what}: error {err:.3g} > 2 x {budget:.3g}"
