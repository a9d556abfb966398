"""visible_attention and qkv_attention on the WMMA kernels of csrc/attention.cu (sequences of up to 256 tokens
in shared memory).

qkv_attention is the model's route (nn.Attention): the kernels read q, k and v through strides of the qkv
Linear output and the backward writes dq, dk and dv into their slices of one dqkv buffer (no copies).
"""

from __future__ import annotations

import torch

from mae_fast import _extension, dispatch
from mae_fast.backends.cuda._library import OPS, support

HEAD_DIMS = (32, 64, 80, 128)
MAX_SEQLEN = 256
MAX_HEADS = 65535  # one grid row per head


def _shared_memory_plan() -> dict[tuple[int, int], int]:
    """Bytes of shared memory per (length padded to 16, head dim), asked of the extension once."""
    if not _extension.available():
        return {}
    needed = _extension.module().visible_attention_shared_memory
    return {(padded, d): needed(padded, d) for d in HEAD_DIMS for padded in range(16, MAX_SEQLEN + 1, 16)}


SHARED_MEMORY = _shared_memory_plan()


def shared_memory_reason(length: int, head_dim: int, device_bytes: int) -> str | None:
    """Why the kernels cannot run sequences of ``length`` tokens at ``head_dim`` with ``device_bytes`` of shared
    memory per block, or None."""
    if length == 0:
        return None
    needed = SHARED_MEMORY[(-(-length // 16) * 16, head_dim)]
    if needed > device_bytes:
        return f"the CUDA attention kernel needs {needed} bytes of shared memory, the device allows {device_bytes}"
    return None


def _fits_the_device(tensor: torch.Tensor, max_seqlen: int, head_dim: int) -> str | None:
    limits = _extension.device_limits(tensor.device)
    return None if limits is None else shared_memory_reason(max_seqlen, head_dim, limits.shared_memory_per_block)


def _visible_fits(q, k, v, cu_seqlens, max_seqlen, scale) -> str | None:
    return _fits_the_device(q, max_seqlen, q.shape[-1])


def _qkv_fits(qkv, num_heads, cu_seqlens, max_seqlen, scale) -> str | None:
    return _fits_the_device(qkv, max_seqlen, qkv.shape[-1] // (3 * num_heads))


def _support(extra) -> dispatch.Support:
    return support(
        "the CUDA attention kernel",
        dtypes=(torch.float16, torch.bfloat16),
        allowed={"head_dim": HEAD_DIMS},
        maximum={"max_seqlen": MAX_SEQLEN, "heads": MAX_HEADS},
        min_capability=(8, 0),
        extra=extra,
    )


def _contiguous_offsets(cu_seqlens: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index cu_seqlens through its data pointer without strides."""
    return None if cu_seqlens is None else cu_seqlens.contiguous()


@dispatch.register("visible_attention", "cuda", _support(_visible_fits))
def _visible_attention(q, k, v, cu_seqlens, max_seqlen, scale):
    return OPS.visible_attention(q, k, v, _contiguous_offsets(cu_seqlens), max(max_seqlen, 1), scale)[0]


@dispatch.register("qkv_attention", "cuda", _support(_qkv_fits))
def _qkv_attention(qkv, num_heads, cu_seqlens, max_seqlen, scale):
    return OPS.qkv_attention(qkv, num_heads, _contiguous_offsets(cu_seqlens), max(max_seqlen, 1), scale)[0]
