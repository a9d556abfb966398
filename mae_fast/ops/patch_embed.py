"""patch_embed_gather: gather of the visible patches + patch-embedding projection + position add."""

from __future__ import annotations

import torch

from mae_fast import dispatch, reference
from mae_fast.ops import _validate


def patch_embed_gather(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Embed only the visible patches: -> [B, K, D].

    imgs [B, C, H, W]; ids_keep [B, K]; weight [D, C, p, p] (the Conv2d layout, so checkpoints load
    unchanged); bias [D] or None; pos_embed [L, D] or [1, L, D] (patch rows, no cls row) or None.
    Equals ``gather(conv2d(imgs, weight, bias, stride=p) + pos_embed, ids_keep)`` with a GEMM over the
    K visible patches only.
    """
    _validate.tensor(weight, "weight", 4, _validate.FLOAT_DTYPES)
    dim, channels, p, q = weight.shape
    if p != q:
        raise ValueError(f"weight must hold square patches [D, C, p, p], got shape {tuple(weight.shape)}")
    b, c, gh, gw = _validate.images(imgs, p)
    if c != channels:
        raise ValueError(f"imgs has {c} channels but weight expects {channels} (weight shape {tuple(weight.shape)})")
    _validate.indices(ids_keep, "ids_keep", b, gh * gw)
    if bias is not None:
        _validate.tensor(bias, "bias", 1, _validate.FLOAT_DTYPES)
        if bias.shape[0] != dim:
            raise ValueError(f"bias must have shape [{dim}], got {tuple(bias.shape)}")
    if pos_embed is not None:
        _validate.tensor(pos_embed, "pos_embed", (2, 3), _validate.FLOAT_DTYPES)
        if pos_embed.shape[-2:] != (gh * gw, dim) or pos_embed.numel() != gh * gw * dim:
            raise ValueError(
                f"pos_embed must have shape [{gh * gw}, {dim}] or [1, {gh * gw}, {dim}] (patch rows only), "
                f"got {tuple(pos_embed.shape)}"
            )
    _validate.same_device(imgs=imgs, ids_keep=ids_keep, weight=weight, bias=bias, pos_embed=pos_embed)
    return dispatch.dispatch("patch_embed_gather", imgs, ids_keep, weight, bias, pos_embed, backend=backend)


dispatch.register("patch_embed_gather", "reference")(reference.patch_embed_gather)
