"""visible_attention and qkv_attention through F.scaled_dot_product_attention (SDPA).

Packed sequences are padded to the longest into one [S, H, N, d] batch with a key-padding mask (one SDPA
call, rather than one per sequence), then unpadded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mae_fast import dispatch
from mae_fast.backends.torch._support import SUPPORT
from mae_fast.ops.attention import split_qkv


def _fixed(q, k, v, scale):
    """q, k, v [B, N, H, d] (any strides) -> [B, N, H, d]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _packed(q, k, v, cu_seqlens, max_seqlen, scale):
    """q, k, v [T, H, d] with cu_seqlens [S+1] -> [T, H, d]."""
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    offsets = torch.arange(max(max_seqlen, 1), device=q.device)
    valid = offsets < lengths.unsqueeze(1)  # [S, N]
    index = (starts.unsqueeze(1) + offsets).clamp_max(max(q.shape[0] - 1, 0))  # [S, N], padding reads a real row
    padded = [t[index].transpose(1, 2) for t in (q, k, v)]  # [S, H, N, d]
    out = F.scaled_dot_product_attention(*padded, attn_mask=valid[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[valid]  # [T, H, d], sequences in order


@dispatch.register("visible_attention", "torch", SUPPORT)
def _visible_attention(q, k, v, cu_seqlens, max_seqlen, scale):
    if cu_seqlens is None:
        return _fixed(q, k, v, scale)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    return _packed(q, k, v, cu_seqlens, max_seqlen, scale)


@dispatch.register("qkv_attention", "torch", SUPPORT)
def _qkv_attention(qkv, num_heads, cu_seqlens, max_seqlen, scale):
    return _visible_attention(*split_qkv(qkv, num_heads), cu_seqlens, max_seqlen, scale).flatten(-2)
