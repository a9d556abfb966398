"""visible_attention: softmax attention over the visible tokens, fixed-length or packed (cu_seqlens)."""

from __future__ import annotations

import torch

from mae_fast import dispatch, reference
from mae_fast.ops import _validate


def visible_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v; q, k, v [B, N, H, d], or packed [T, H, d] with int32 cu_seqlens [S+1].

    scale defaults to d ** -0.5. Returns the layout of q.
    """
    _validate.tensor(q, "q", (3, 4), _validate.FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        _validate.tensor(t, name, q.dim(), _validate.FLOAT_DTYPES)
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"{name} must match q: shape {tuple(q.shape)} {q.dtype}, got {tuple(t.shape)} {t.dtype}")
    if cu_seqlens is None and q.dim() != 4:
        raise ValueError(f"q must be [B, N, H, d] without cu_seqlens, got shape {tuple(q.shape)}")
    if cu_seqlens is not None:
        if q.dim() != 3:
            raise ValueError(f"q must be packed [T, H, d] with cu_seqlens, got shape {tuple(q.shape)}")
        validate_cu_seqlens(cu_seqlens, q.shape[0])
    _validate.same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    return dispatch.dispatch("visible_attention", q, k, v, cu_seqlens, max_seqlen, scale, backend=backend)


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> None:
    """int32 [S+1], starting at 0, non-decreasing, ending at total_tokens."""
    _validate.tensor(cu_seqlens, "cu_seqlens", 1)
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets, got {cu_seqlens.numel()}")
    if cu_seqlens.device.type == "cpu":
        values = cu_seqlens.tolist()
        if values[0] != 0 or values[-1] != total_tokens:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at {total_tokens} (q.shape[0]), got {values[0]}..{values[-1]}"
            )
        if any(b < a for a, b in zip(values[:-1], values[1:], strict=True)):
            raise ValueError("cu_seqlens must be non-decreasing")


@dispatch.register("visible_attention", "reference")
def _attention_reference(q, k, v, cu_seqlens, max_seqlen, scale):
    if cu_seqlens is None:
        return reference.attention(q, k, v, scale)[0]
    return reference.varlen_attention(q, k, v, cu_seqlens, scale)[0]
