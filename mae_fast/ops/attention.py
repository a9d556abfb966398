"""visible_attention: softmax attention over the visible tokens, fixed-length or packed (cu_seqlens).

Two public ops:

- :func:`visible_attention` takes q, k, v [B, N, H, d] or packed [T, H, d] with int32 ``cu_seqlens``.
- :func:`qkv_attention` takes the qkv Linear output as it is ([B, N, 3*H*d] or packed [T, 3*H*d], timm's
  (3, H, d) order) and returns [B, N, H*d] (or [T, H*d]) ready for ``proj``: a kernel reads q, k, v
  through strides and writes the gradient into one dqkv buffer, so nothing is transposed or copied.

Primitives: ``visible_attention`` / ``visible_attention_backward`` and ``qkv_attention`` /
``qkv_attention_backward``. The forward returns the output and the fp32 natural-log lse, [H, T] for both
layouts (T = B * N when fixed-length); the backward takes the lse, not the output (every backend forms
D = rowsum(P * dP) in fp32 from the unrounded P and dP). ``max_seqlen`` is a Python int: pass it for
packed inputs on a GPU, or it is read from cu_seqlens with one device sync.
"""

from __future__ import annotations

import torch

from mae_fast import dispatch, primitives
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

    scale defaults to d ** -0.5; given, it must be a positive finite number. ``max_seqlen`` (packed
    only) is the longest sequence, a Python int.
    Returns the layout and dtype of q (fp32/fp16/bf16 on the Triton backend, fp32 accumulation).
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
    max_seqlen = _max_seqlen(max_seqlen, cu_seqlens, None if cu_seqlens is not None else q.shape[1])
    scale = _scale(scale, q.shape[-1])
    return dispatch.dispatch("visible_attention", q, k, v, cu_seqlens, max_seqlen, scale, backend=backend)


def qkv_attention(
    qkv: torch.Tensor,
    num_heads: int,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention straight from the qkv Linear output: [B, N, 3*H*d] -> [B, N, H*d], or packed [T, 3*H*d] with
    int32 cu_seqlens [S+1] -> [T, H*d]. The last dim holds (3, H, d) in that order (timm and the MAE release).

    scale defaults to d ** -0.5 (else a positive finite number); ``max_seqlen`` as in :func:`visible_attention`.
    """
    _validate.tensor(qkv, "qkv", (2, 3), _validate.FLOAT_DTYPES)
    _validate.positive_int(num_heads, "num_heads")
    if qkv.shape[-1] % (3 * num_heads) or qkv.shape[-1] == 0:
        raise ValueError(f"qkv last dim must be 3 * num_heads * head_dim with num_heads={num_heads}, got {qkv.shape}")
    if cu_seqlens is None and qkv.dim() != 3:
        raise ValueError(f"qkv must be [B, N, 3*H*d] without cu_seqlens, got shape {tuple(qkv.shape)}")
    if cu_seqlens is not None:
        if qkv.dim() != 2:
            raise ValueError(f"qkv must be packed [T, 3*H*d] with cu_seqlens, got shape {tuple(qkv.shape)}")
        validate_cu_seqlens(cu_seqlens, qkv.shape[0])
    _validate.same_device(qkv=qkv, cu_seqlens=cu_seqlens)
    max_seqlen = _max_seqlen(max_seqlen, cu_seqlens, None if cu_seqlens is not None else qkv.shape[1])
    scale = _scale(scale, qkv.shape[-1] // (3 * num_heads))
    return dispatch.dispatch("qkv_attention", qkv, num_heads, cu_seqlens, max_seqlen, scale, backend=backend)


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> None:
    """int32 [S+1], starting at 0, non-decreasing, ending at total_tokens.

    The values are checked where index values are (_validate.host_checks_enabled: on the CPU, or on a GPU
    with MAE_FAST_CHECK_INDICES=1, never while tracing): on a GPU the check would sync every call.
    """
    _validate.tensor(cu_seqlens, "cu_seqlens", 1)
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets, got {cu_seqlens.numel()}")
    if _validate.host_checks_enabled(cu_seqlens):
        values = cu_seqlens.tolist()
        if values[0] != 0 or values[-1] != total_tokens:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at {total_tokens} (the token count), got {values[0]}..{values[-1]}"
            )
        if any(b < a for a, b in zip(values[:-1], values[1:], strict=True)):
            raise ValueError("cu_seqlens must be non-decreasing")


def _max_seqlen(max_seqlen, cu_seqlens: torch.Tensor | None, fixed_length: int | None) -> int:
    """The validated longest sequence: the fixed length, the given max_seqlen, or read from cu_seqlens."""
    if max_seqlen is None:
        return fixed_length if cu_seqlens is None else longest(cu_seqlens)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative Python int or None, got {max_seqlen!r}")
    if fixed_length is not None and max_seqlen != fixed_length:
        raise ValueError(f"max_seqlen={max_seqlen} does not match the sequence length {fixed_length}")
    if cu_seqlens is not None and _validate.host_checks_enabled(cu_seqlens):
        actual = longest(cu_seqlens)
        if max_seqlen < actual:
            raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence in cu_seqlens ({actual})")
    return max_seqlen


def longest(cu_seqlens: torch.Tensor) -> int:
    """The longest packed sequence (a device sync on a GPU: pass max_seqlen to avoid it)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _scale(scale, head_dim: int) -> float:
    """The softmax scale: head_dim ** -0.5 for None, else a positive finite Python number."""
    if head_dim < 1:
        raise ValueError(f"head_dim (the last dimension of q, k, v) must be at least 1, got {head_dim}")
    if scale is None:
        return head_dim**-0.5
    return _validate.positive_finite(scale, "scale")


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q, k, v [..., H, d] of qkv [..., 3*H*d] (no copy)."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    return qkv.unflatten(-1, (3, num_heads, head_dim)).unbind(-3)


def _visible_inputs(q, k, v, cu_seqlens, max_seqlen, scale) -> dispatch.Inputs:
    sizes = {"head_dim": q.shape[-1], "max_seqlen": max_seqlen, "heads": q.shape[-2]}
    return dispatch.Inputs({"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens}, ("q", "k", "v"), sizes)


def _qkv_inputs(qkv, num_heads, cu_seqlens, max_seqlen, scale) -> dispatch.Inputs:
    sizes = {"head_dim": qkv.shape[-1] // (3 * num_heads), "max_seqlen": max_seqlen, "heads": num_heads}
    return dispatch.Inputs({"qkv": qkv, "cu_seqlens": cu_seqlens}, ("qkv",), sizes)


dispatch.define_op("visible_attention", _visible_inputs)
dispatch.define_op("qkv_attention", _qkv_inputs)


# --- primitives ------------------------------------------------------------------------------------------


def _tokens(x: torch.Tensor, packed: bool) -> int:
    """T of the lse [H, T]: the packed token count, or B * N for a fixed-length batch."""
    return x.shape[0] if packed else x.shape[0] * x.shape[1]


@primitives.define(
    "visible_attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, int max_seqlen, float scale) "
    "-> (Tensor, Tensor)"
)
def _attention_fake(q, k, v, cu_seqlens, max_seqlen, scale):
    """-> (out: q's shape and dtype, contiguous; lse [H, T] fp32)."""
    lse = q.new_empty(q.shape[-2], _tokens(q, cu_seqlens is not None), dtype=torch.float32)
    return q.new_empty(q.shape), lse


@primitives.define(
    "visible_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor? cu_seqlens, "
    "int max_seqlen, float scale) -> (Tensor, Tensor, Tensor)"
)
def _attention_backward_fake(grad_out, q, k, v, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.mark_non_differentiable(lse)


@primitives.formula("visible_attention", _attention_setup)
def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, lse, cu_seqlens = ctx.saved_tensors
    grads = ctx.ops.visible_attention_backward(
        grad_out.contiguous(), q, k, v, lse, cu_seqlens, ctx.max_seqlen, ctx.scale
    )
    return (*grads, None, None, None)


@primitives.define(
    "qkv_attention(Tensor qkv, int num_heads, Tensor? cu_seqlens, int max_seqlen, float scale) -> (Tensor, Tensor)"
)
def _qkv_attention_fake(qkv, num_heads, cu_seqlens, max_seqlen, scale):
    """-> (out [..., H*d] in qkv's dtype, contiguous; lse [H, T] fp32)."""
    out = qkv.new_empty(*qkv.shape[:-1], qkv.shape[-1] // 3)
    return out, qkv.new_empty(num_heads, _tokens(qkv, cu_seqlens is not None), dtype=torch.float32)


@primitives.define(
    "qkv_attention_backward(Tensor grad_out, Tensor qkv, Tensor lse, int num_heads, Tensor? cu_seqlens, "
    "int max_seqlen, float scale) -> Tensor"
)
def _qkv_attention_backward_fake(grad_out, qkv, lse, num_heads, cu_seqlens, max_seqlen, scale):
    return qkv.new_empty(qkv.shape)


def _qkv_attention_setup(ctx, inputs, output):
    qkv, num_heads, cu_seqlens, max_seqlen, scale = inputs
    _, lse = output
    ctx.save_for_backward(qkv, lse, cu_seqlens)
    ctx.num_heads, ctx.max_seqlen, ctx.scale = num_heads, max_seqlen, scale
    ctx.mark_non_differentiable(lse)


@primitives.formula("qkv_attention", _qkv_attention_setup)
def _qkv_attention_backward(ctx, grad_out, _grad_lse):
    qkv, lse, cu_seqlens = ctx.saved_tensors
    dqkv = ctx.ops.qkv_attention_backward(
        grad_out.contiguous(), qkv, lse, ctx.num_heads, cu_seqlens, ctx.max_seqlen, ctx.scale
    )
    return dqkv, None, None, None, None
