"""How the Triton kernels run here; shared by every kernel module.

Under TRITON_INTERPRET=1 (CPU tests) bf16 arithmetic and tl.dot act on raw bits and fp32 -> bf16
stores truncate, so kernels load bf16 as fp32 when ``UPCAST_BF16`` is set (a constexpr argument:
the GPU build keeps bf16 tensor-core dots).
"""

import contextlib
import os

import torch
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
UPCAST_BF16 = INTERPRETING

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def device_guard(tensor: torch.Tensor):
    """Launch on ``tensor``'s GPU: Triton launches on the current device and its current stream."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
