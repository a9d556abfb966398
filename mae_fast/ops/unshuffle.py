"""unshuffle_mask_tokens: the decoder input (mask tokens, original order, position table) in one op."""

from __future__ import annotations

import torch

from mae_fast import dispatch, reference
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
    [1, L+1, Dd], cls row first) added.
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
