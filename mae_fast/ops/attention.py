"""visible_attention: softmax attention over the visible tokens, fixed-length or packed (cu_seqlens).

Two public ops, each with a "reference" and a "triton" backend:

- :func:`visible_attention` takes q, k, v [B, N, H, d] or packed [T, H, d] with int32 ``cu_seqlens``.
- :func:`qkv_attention` takes the qkv Linear output as it is ([B, N, 3*H*d] or packed [T, 3*H*d], timm's
  (3, H, d) order) and returns [B, N, H*d] (or [T, H*d]) ready for ``proj``: the kernels read q, k, v
  through strides and write the gradient into one dqkv buffer, so nothing is transposed or copied.

The Triton backend runs through the torch.library custom ops ``mae_fast_triton::attention`` and
``mae_fast_triton::qkv_attention`` (with fake implementations and autograd formulas), so torch.compile
traces them with fullgraph=True. ``max_seqlen`` is a Python int: pass it for packed inputs on a GPU, or it
is read from cu_seqlens with one device sync.
"""

from __future__ import annotations

import torch

from mae_fast import dispatch, reference
from mae_fast.ops import _validate

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 128


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

    scale defaults to d ** -0.5. ``max_seqlen`` (packed only) is the longest sequence, a Python int.
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
    _validate_max_seqlen(max_seqlen, cu_seqlens, None if cu_seqlens is not None else q.shape[1])
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

    scale defaults to d ** -0.5; ``max_seqlen`` as in :func:`visible_attention`.
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
    _validate_max_seqlen(max_seqlen, cu_seqlens, None if cu_seqlens is not None else qkv.shape[1])
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


def _validate_max_seqlen(max_seqlen, cu_seqlens: torch.Tensor | None, fixed_length: int | None) -> None:
    if max_seqlen is None:
        return
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative Python int or None, got {max_seqlen!r}")
    if fixed_length is not None and max_seqlen != fixed_length:
        raise ValueError(f"max_seqlen={max_seqlen} does not match the sequence length {fixed_length}")
    if cu_seqlens is not None and _validate.host_checks_enabled(cu_seqlens):
        longest = _longest(cu_seqlens)
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence in cu_seqlens ({longest})")


def _longest(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # a device sync on the GPU


def _scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q, k, v [..., H, d] of qkv [..., 3*H*d] (no copy)."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    return qkv.unflatten(-1, (3, num_heads, head_dim)).unbind(-3)


# --- reference backend ---------------------------------------------------------------------------------


@dispatch.register("visible_attention", "reference")
def _attention_reference(q, k, v, cu_seqlens, max_seqlen, scale):
    if cu_seqlens is None:
        return reference.attention(q, k, v, scale)[0]
    return reference.varlen_attention(q, k, v, cu_seqlens, scale)[0]


@dispatch.register("qkv_attention", "reference")
def _qkv_attention_reference(qkv, num_heads, cu_seqlens, max_seqlen, scale):
    out = _attention_reference(*_split_qkv(qkv, num_heads), cu_seqlens, max_seqlen, scale)
    return out.flatten(-2)


# --- Triton backend: custom ops, fake implementations, autograd ------------------------------------------


def _triton_check(q: torch.Tensor, cu_seqlens: torch.Tensor | None, head_dim: int) -> str | None:
    reason = dispatch.triton_unavailable(q, cu_seqlens)
    if reason is not None:
        return reason
    if q.dtype not in TRITON_DTYPES:
        return f"dtype {q.dtype} is not supported (fp32, fp16, bf16)"
    if head_dim > TRITON_MAX_HEAD_DIM:
        return f"head dim {head_dim} is above {TRITON_MAX_HEAD_DIM}"
    return None


def _staging_dtype(dtype: torch.dtype) -> torch.dtype:
    from mae_fast.kernels import attention as kernels

    return torch.float32 if kernels.upcasts(dtype) else dtype


def _lse_shape(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[int, ...]:
    """lse is [B, H, N] for q [B, N, H, d] and [H, T] for packed q [T, H, d]."""
    if cu_seqlens is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("mae_fast_triton::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from mae_fast.kernels import attention as kernels

    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    out = torch.empty(q.shape, dtype=_staging_dtype(q.dtype), device=q.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens), dtype=torch.float32, device=q.device)
    kernels.attention_forward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale)
    return out.to(q.dtype), lse


@_attention_op.register_fake
def _attention_fake(q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens), dtype=torch.float32)


@torch.library.custom_op("mae_fast_triton::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from mae_fast.kernels import attention as kernels

    q, k, v, out, grad_out = (_unit_stride(t) for t in (q, k, v, out, grad_out))
    stage = _staging_dtype(q.dtype)
    dq, dk, dv = (torch.empty(q.shape, dtype=stage, device=q.device) for _ in range(3))
    kernels.attention_backward(grad_out, q, k, v, out, lse, dq, dk, dv, cu_seqlens, max_seqlen, scale)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen = max_seqlen
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


@torch.library.custom_op("mae_fast_triton::qkv_attention", mutates_args=())
def _qkv_attention_op(
    qkv: torch.Tensor, num_heads: int, cu_seqlens: torch.Tensor | None, max_seqlen: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from mae_fast.kernels import attention as kernels

    q, k, v = _split_qkv(_unit_stride(qkv), num_heads)
    out = torch.empty(q.shape, dtype=_staging_dtype(qkv.dtype), device=qkv.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens), dtype=torch.float32, device=qkv.device)
    kernels.attention_forward(q, k, v, out, lse, cu_seqlens, max_seqlen, scale)
    return out.flatten(-2).to(qkv.dtype), lse


def _qkv_out_shape(qkv: torch.Tensor) -> tuple[int, ...]:
    return (*qkv.shape[:-1], qkv.shape[-1] // 3)


@_qkv_attention_op.register_fake
def _qkv_attention_fake(qkv, num_heads, cu_seqlens, max_seqlen, scale):
    q = _split_qkv(qkv, num_heads)[0]
    return qkv.new_empty(_qkv_out_shape(qkv)), qkv.new_empty(_lse_shape(q, cu_seqlens), dtype=torch.float32)


@torch.library.custom_op("mae_fast_triton::qkv_attention_backward", mutates_args=())
def _qkv_attention_backward_op(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    from mae_fast.kernels import attention as kernels

    qkv, out, grad_out = _unit_stride(qkv), _unit_stride(out), _unit_stride(grad_out)
    dqkv = torch.empty(qkv.shape, dtype=_staging_dtype(qkv.dtype), device=qkv.device)
    q, k, v = _split_qkv(qkv, num_heads)
    dq, dk, dv = _split_qkv(dqkv, num_heads)
    heads_view = q.shape[-2:]
    kernels.attention_backward(
        grad_out.unflatten(-1, heads_view),
        q,
        k,
        v,
        out.unflatten(-1, heads_view),
        lse,
        dq,
        dk,
        dv,
        cu_seqlens,
        max_seqlen,
        scale,
    )
    return dqkv.to(qkv.dtype)


@_qkv_attention_backward_op.register_fake
def _qkv_attention_backward_fake(grad_out, qkv, out, lse, num_heads, cu_seqlens, max_seqlen, scale):
    return qkv.new_empty(qkv.shape)


def _qkv_attention_setup(ctx, inputs, output):
    qkv, num_heads, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu_seqlens)
    ctx.num_heads = num_heads
    ctx.max_seqlen = max_seqlen
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _qkv_attention_backward(ctx, grad_out, grad_lse):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    dqkv = _qkv_attention_backward_op(grad_out, qkv, out, lse, ctx.num_heads, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dqkv, None, None, None, None


_qkv_attention_op.register_autograd(_qkv_attention_backward, setup_context=_qkv_attention_setup)


def _resolved_max_seqlen(max_seqlen: int | None, cu_seqlens: torch.Tensor | None, fixed_length: int) -> int:
    if cu_seqlens is None:
        return fixed_length
    return _longest(cu_seqlens) if max_seqlen is None else max_seqlen


def _check_visible(q, k, v, cu_seqlens, max_seqlen, scale):
    return _triton_check(q, cu_seqlens, q.shape[-1])


def _check_qkv(qkv, num_heads, cu_seqlens, max_seqlen, scale):
    return _triton_check(qkv, cu_seqlens, qkv.shape[-1] // (3 * num_heads))


@dispatch.register("visible_attention", "triton", check=_check_visible)
def _attention_triton(q, k, v, cu_seqlens, max_seqlen, scale):
    max_seqlen = _resolved_max_seqlen(max_seqlen, cu_seqlens, q.shape[1])
    return torch.ops.mae_fast_triton.attention(q, k, v, cu_seqlens, max_seqlen, scale)[0]


@dispatch.register("qkv_attention", "triton", check=_check_qkv)
def _qkv_attention_triton(qkv, num_heads, cu_seqlens, max_seqlen, scale):
    max_seqlen = _resolved_max_seqlen(max_seqlen, cu_seqlens, qkv.shape[1])
    return torch.ops.mae_fast_triton.qkv_attention(qkv, num_heads, cu_seqlens, max_seqlen, scale)[0]
