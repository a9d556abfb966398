"""visible_attention and qkv_attention: the reference (explicit softmax, per packed sequence when varlen)."""

from mae_fast import dispatch, reference
from mae_fast.backends.reference._support import SUPPORT
from mae_fast.ops.attention import split_qkv


@dispatch.register("visible_attention", "reference", SUPPORT)
def _visible_attention(q, k, v, cu_seqlens, max_seqlen, scale):
    if cu_seqlens is None:
        return reference.attention(q, k, v, scale)[0]
    return reference.varlen_attention(q, k, v, cu_seqlens, scale)[0]


@dispatch.register("qkv_attention", "reference", SUPPORT)
def _qkv_attention(qkv, num_heads, cu_seqlens, max_seqlen, scale):
    return _visible_attention(*split_qkv(qkv, num_heads), cu_seqlens, max_seqlen, scale).flatten(-2)
