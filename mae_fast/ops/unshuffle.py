"""unshuffle_mask_tokens: the decoder input (mask tokens, original order, position table) in one op."""

from __future__ import annotations

import torch

from mae_fast import dispatch, reference
from mae_fast.ops import _validate
from mae_fast.ops.patchify import repeated_ids_reason


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


dispatch.register("unshuffle_mask_tokens", "reference")(reference.unshuffle_mask_tokens)


# --- "triton" backend: torch.library custom ops over kernels/unshuffle.py ---------------------------


@torch.library.custom_op("mae_fast_triton::unshuffle_mask_tokens", mutates_args=())
def _triton_unshuffle(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor | None
) -> torch.Tensor:
    """x [B, K+1, Dd] -> [B, L+1, Dd] in x's dtype (mask_token and pos_embed may be any float dtype)."""
    from mae_fast.kernels import unshuffle as kernel

    return kernel.forward(x, mask_token, ids_restore, pos_embed)


@_triton_unshuffle.register_fake
def _(x, mask_token, ids_restore, pos_embed):
    return x.new_empty(x.shape[0], ids_restore.shape[1] + 1, x.shape[2])


@torch.library.custom_op("mae_fast_triton::unshuffle_mask_tokens_backward", mutates_args=())
def _triton_unshuffle_backward(
    grad_out: torch.Tensor, ids_restore: torch.Tensor, num_visible: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out [B, L+1, Dd] -> (grad_x [B, K+1, Dd], per-image masked-row sums [B, Dd] fp32)."""
    from mae_fast.kernels import unshuffle as kernel

    return kernel.backward(grad_out, ids_restore, num_visible)


@_triton_unshuffle_backward.register_fake
def _(grad_out, ids_restore, num_visible):
    b, _, dim = grad_out.shape
    return grad_out.new_empty(b, num_visible + 1, dim), grad_out.new_empty(b, dim, dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, mask_token, ids_restore, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.num_visible = x.shape[1] - 1
    ctx.mask_token = (mask_token.shape, mask_token.dtype)
    ctx.pos = None if pos_embed is None else (pos_embed.shape, pos_embed.dtype)


def _backward(ctx, grad):
    """grad_x: rows moved back; grad_mask_token: sum of the masked rows (two stages, deterministic)."""
    (ids_restore,) = ctx.saved_tensors
    grad_x = grad_mask = grad_pos = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_x, partial = torch.ops.mae_fast_triton.unshuffle_mask_tokens_backward(grad, ids_restore, ctx.num_visible)
        if ctx.needs_input_grad[1]:
            shape, dtype = ctx.mask_token
            grad_mask = partial.sum(dim=0).to(dtype).reshape(shape)
    if ctx.needs_input_grad[3]:
        shape, dtype = ctx.pos
        grad_pos = grad.sum(dim=0, dtype=torch.float32).to(dtype).reshape(shape)
    return grad_x, grad_mask, None, grad_pos


_triton_unshuffle.register_autograd(_backward, setup_context=_setup)


def _triton_check(x, mask_token, ids_restore, pos_embed) -> str | None:
    reason = dispatch.triton_unavailable(x, mask_token, ids_restore, pos_embed)
    reason = reason or repeated_ids_reason(ids_restore, "ids_restore", permutation=True)
    if reason is None and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"x is {x.dtype}; the Triton kernel takes float32, float16 or bfloat16 (it adds in fp32)"
    return reason


@dispatch.register("unshuffle_mask_tokens", "triton", check=_triton_check)
def _triton_unshuffle_mask_tokens(x, mask_token, ids_restore, pos_embed):
    return torch.ops.mae_fast_triton.unshuffle_mask_tokens(x, mask_token, ids_restore, pos_embed)
