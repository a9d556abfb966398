"""Position embeddings at another grid: exact sin-cos tables, bicubic interpolation of learned ones.

Fine-tuning at another resolution than pretraining (28 -> 32 px, 224 -> 448 px) changes the patch grid.
A fixed 2-D sin-cos table is regenerated for the new grid (exactly what a model built at that size holds);
a learned table is resized as the release's ``interpolate_pos_embed`` does: the patch rows are laid out on
their (gh, gw) grid and resized bicubically, the prefix rows (the cls token's) are kept unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mae_fast import reference


def _grid(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a positive int or a pair (rows, cols) of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def sincos_pos_embed(dim: int, grid_size, num_prefix_tokens: int = 1) -> torch.Tensor:
    """The release's fixed table [1, num_prefix_tokens + gh * gw, dim] (fp32; prefix rows zero)."""
    gh, gw = _grid(grid_size, "grid_size")
    table = reference.sincos_pos_embed_2d(dim, (gh, gw), cls_token=False)
    return torch.cat([table.new_zeros(num_prefix_tokens, dim), table])[None]


def resize_pos_embed(
    pos_embed: torch.Tensor,
    old_grid,
    new_grid,
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
) -> torch.Tensor:
    """``pos_embed`` [1, prefix + oh * ow, D] (or without the leading 1) for ``new_grid`` (rows, cols).

    ``mode="bicubic"``: the patch rows are interpolated (bicubic, align_corners=False, computed in fp32 and
    returned in the input's dtype), the prefix rows kept. ``mode="sincos"``: the fixed sin-cos table of
    the new grid (the prefix rows are kept as they are; the release's are zero). The same grid returns
    an unchanged copy. Non-square grids are supported in both modes.
    """
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.ndim not in (2, 3):
        raise ValueError("pos_embed must be a tensor [1, N, D] or [N, D]")
    if mode not in ("bicubic", "sincos"):
        raise ValueError(f"mode must be 'bicubic' or 'sincos', got {mode!r}")
    squeeze = pos_embed.ndim == 2
    table = pos_embed[None] if squeeze else pos_embed
    if table.shape[0] != 1:
        raise ValueError(f"pos_embed must have a leading dim of 1, got shape {tuple(pos_embed.shape)}")
    oh, ow = _grid(old_grid, "old_grid")
    nh, nw = _grid(new_grid, "new_grid")
    if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    dim = table.shape[-1]
    if table.shape[1] != num_prefix_tokens + oh * ow:
        raise ValueError(
            f"pos_embed has {table.shape[1]} rows, but old_grid {(oh, ow)} with {num_prefix_tokens} prefix "
            f"token(s) needs {num_prefix_tokens + oh * ow}"
        )
    prefix, patches = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    if (oh, ow) == (nh, nw):
        resized = patches.clone()
    elif mode == "sincos":
        resized = reference.sincos_pos_embed_2d(dim, (nh, nw))[None].to(table.dtype).to(table.device)
    else:
        grid = patches.reshape(1, oh, ow, dim).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
        resized = grid.permute(0, 2, 3, 1).reshape(1, nh * nw, dim).to(table.dtype)
    out = torch.cat([prefix, resized], dim=1)
    return out[0] if squeeze else out
