"""visible_attention and qkv_attention on the Triton kernels of kernels/attention.py.

The kernels read q, k, v (and qkv's three slices) through strides with unit stride along the head dim, and
write the lse as [H, T] for both layouts (a fixed-length batch is addressed through a [B, H, N] view of it).
Under the interpreter bf16 is computed in fp32, so outputs are staged in fp32 there and cast once.
"""

from __future__ import annotations

import torch

from mae_fast import dispatch
from mae_fast.backends.triton import _library
from mae_fast.ops.attention import split_qkv

MAX_HEAD_DIM = 128


def _staging_dtype(dtype: torch.dtype) -> torch.dtype:
    from mae_fast.kernels import attention as kernels

    return torch.float32 if kernels.upcasts(dtype) else dtype


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _lse_view(lse: torch.Tensor, q: torch.Tensor, packed: bool) -> torch.Tensor:
    """The view of lse [H, T] the kernels index: itself when packed, [B, H, N] for q [B, N, H, d]."""
    return lse if packed else lse.view(lse.shape[0], q.shape[0], q.shape[1]).transpose(0, 1)


def _new_lse(q: torch.Tensor, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = q.shape[0] if packed else q.shape[0] * q.shape[1]
    lse = torch.empty(q.shape[-2], tokens, dtype=torch.float32, device=q.device)
    return lse, _lse_view(lse, q, packed)


def _forward(q, k, v, cu_seqlens, max_seqlen, scale):
    from mae_fast.kernels import attention as kernels

    packed = cu_seqlens is not None
    out = torch.empty(q.shape, dtype=_staging_dtype(q.dtype), device=q.device)
    lse, lse_view = _new_lse(q, packed)
    kernels.attention_forward(_unit_stride(q), _unit_stride(k), _unit_stride(v), out, lse_view, cu_seqlens,
                              max_seqlen, scale)  # fmt: skip
    return out.to(q.dtype), lse


def _backward(grad_out, q, k, v, lse, cu_seqlens, max_seqlen, scale):
    from mae_fast.kernels import attention as kernels

    q, k, v, grad_out = (_unit_stride(t) for t in (q, k, v, grad_out))
    stage = _staging_dtype(q.dtype)
    dq, dk, dv = (torch.empty(q.shape, dtype=stage, device=q.device) for _ in range(3))
    lse_view = _lse_view(lse, q, cu_seqlens is not None)
    kernels.attention_backward(grad_out, q, k, v, lse_view, dq, dk, dv, cu_seqlens, max_seqlen, scale)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


def _qkv_forward(qkv, num_heads, cu_seqlens, max_seqlen, scale):
    from mae_fast.kernels import attention as kernels

    q, k, v = split_qkv(_unit_stride(qkv), num_heads)
    out = torch.empty(q.shape, dtype=_staging_dtype(qkv.dtype), device=qkv.device)
    lse, lse_view = _new_lse(q, cu_seqlens is not None)
    kernels.attention_forward(q, k, v, out, lse_view, cu_seqlens, max_seqlen, scale)
    return out.flatten(-2).to(qkv.dtype), lse


def _qkv_backward(grad_out, qkv, lse, num_heads, cu_seqlens, max_seqlen, scale):
    """The gradients of q, k and v are written into their slices of one dqkv buffer (no cat, no copy)."""
    from mae_fast.kernels import attention as kernels

    qkv, grad_out = _unit_stride(qkv), _unit_stride(grad_out)
    dqkv = torch.empty(qkv.shape, dtype=_staging_dtype(qkv.dtype), device=qkv.device)
    q, k, v = split_qkv(qkv, num_heads)
    dq, dk, dv = split_qkv(dqkv, num_heads)
    heads = q.shape[-2:]
    lse_view = _lse_view(lse, q, cu_seqlens is not None)
    kernels.attention_backward(
        grad_out.unflatten(-1, heads), q, k, v, lse_view, dq, dk, dv, cu_seqlens, max_seqlen, scale
    )
    return dqkv.to(qkv.dtype)


_library.implement(
    ("visible_attention", "visible_attention_backward", "qkv_attention", "qkv_attention_backward"),
    {
        "visible_attention": _forward,
        "visible_attention_backward": _backward,
        "qkv_attention": _qkv_forward,
        "qkv_attention_backward": _qkv_backward,
    },
)
OPS = _library.ops()
SUPPORT = _library.support("the Triton attention kernel", maximum={"head_dim": MAX_HEAD_DIM})


@dispatch.register("visible_attention", "triton", SUPPORT)
def _visible_attention(q, k, v, cu_seqlens, max_seqlen, scale):
    return OPS.visible_attention(q, k, v, cu_seqlens, max_seqlen, scale)[0]


@dispatch.register("qkv_attention", "triton", SUPPORT)
def _qkv_attention(qkv, num_heads, cu_seqlens, max_seqlen, scale):
    return OPS.qkv_attention(qkv, num_heads, cu_seqlens, max_seqlen, scale)[0]
