"""unshuffle_mask_tokens: the decoder input (mask tokens, original order, position table) in one op.

Primitives: ``unshuffle_mask_tokens`` and ``unshuffle_mask_tokens_backward`` (the rows moved back to x's
order, and the mask token's gradient: the sum of the masked rows, in fp32).
"""

from __future__ import annotations

import torch

from mae_fast import dispatch, primitives
from mae_fast.ops import _validate


def unshuffle_mask_tokens(
    x: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """[B, K+1, Dd] embedded tokens (cls first) -> decoder input [B, L+1, Dd].

    The K visible tokens are followed by L-K copies of mask_token ([1, 1, Dd] or [Dd]), put back into
    the original patch order with ids_restore [B, L], cls prepended and pos_embed ([L+1, Dd] or
    [1, L+1, Dd], cls row first) added. Each row of ids_restore is a permutation of 0..L-1 (what
    random_masking returns; the Triton backend relies on it). The output has x's dtype.
    """
    _validate.tensor(x, "x", 3, _validate.FLOAT_DTYPES)
    b, k1, dim = x.shape
    _validate.tensor(mask_token, "mask_token", (1, 3), _validate.FLOAT_DTYPES)
    if mask_token.numel() != dim:
        raise ValueError(f"mask_token must hold {dim} values ([1, 1, {dim}] or [{dim}]), got {tuple(mask_token.shape)}")
    _validate.tensor(ids_restore, "ids_restore", 2)
    length = ids_restore.shape[1]
    if not 1 <= k1 - 1 <= length:
        raise ValueError(f"x must hold cls + 1..{length} visible tokens, got {k1} tokens")
    _validate.indices(ids_restore, "ids_restore", b, length)
    if pos_embed is not None:
        _validate.tensor(pos_embed, "pos_embed", (2, 3), _validate.FLOAT_DTYPES)
        if pos_embed.shape[-2:] != (length + 1, dim) or pos_embed.numel() != (length + 1) * dim:
            raise ValueError(
                f"pos_embed must have shape [{length + 1}, {dim}] or [1, {length + 1}, {dim}], "
                f"got {tuple(pos_embed.shape)}"
            )
    _validate.same_device(x=x, mask_token=mask_token, ids_restore=ids_restore, pos_embed=pos_embed)
    return dispatch.dispatch("unshuffle_mask_tokens", x, mask_token, ids_restore, pos_embed, backend=backend)


def _inputs(x, mask_token, ids_restore, pos_embed) -> dispatch.Inputs:
    tensors = {"x": x, "mask_token": mask_token, "ids_restore": ids_restore, "pos_embed": pos_embed}
    sizes = {"batch": x.shape[0], "patches": ids_restore.shape[1]}
    return dispatch.Inputs(tensors, ("x", "mask_token", "pos_embed"), sizes)


dispatch.define_op("unshuffle_mask_tokens", _inputs)


# --- primitives ------------------------------------------------------------------------------------------


@primitives.define(
    "unshuffle_mask_tokens(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed) -> Tensor"
)
def _unshuffle_fake(x, mask_token, ids_restore, pos_embed):
    return x.new_empty(x.shape[0], ids_restore.shape[1] + 1, x.shape[2])


@primitives.define(
    "unshuffle_mask_tokens_backward(Tensor grad, Tensor ids_restore, int len_keep, bool mask_token_grad) "
    "-> (Tensor, Tensor)"
)
def _unshuffle_backward_fake(grad, ids_restore, len_keep, mask_token_grad):
    """-> (grad_x [B, len_keep+1, Dd] in grad's dtype, grad_mask_token [Dd] fp32, or [0] when not asked for)."""
    grad_x = grad.new_empty(grad.shape[0], len_keep + 1, grad.shape[2])
    return grad_x, grad.new_empty(grad.shape[2] if mask_token_grad else 0, dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, mask_token, ids_restore, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.len_keep = x.shape[1] - 1
    ctx.mask_token = (mask_token.shape, mask_token.dtype)
    ctx.pos = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)


@primitives.formula("unshuffle_mask_tokens", _setup)
def _backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    need_x, need_mask_token, _, need_pos = ctx.needs_input_grad
    grad_x = grad_mask_token = grad_pos = None
    if need_x or need_mask_token:
        grad_x, grad_mask_token = ctx.ops.unshuffle_mask_tokens_backward(
            grad.contiguous(), ids_restore, ctx.len_keep, bool(need_mask_token)
        )
        if need_mask_token:
            shape, dtype = ctx.mask_token
            grad_mask_token = grad_mask_token.to(dtype).reshape(shape)
        else:
            grad_mask_token = None
    if need_pos:
        shape, dtype = ctx.pos
        grad_pos = grad.sum(dim=0, dtype=torch.float32).to(dtype).reshape(shape)
    return grad_x if need_x else None, grad_mask_token, None, grad_pos
