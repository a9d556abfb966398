"""Plain PyTorch reference of every MAE hot op: the specification all kernels are tested against.

Everything here follows docs/mae-spec.md (He et al., 2021 and the authors' release) and is
written for readability, not speed. Shapes use B = batch, C = channels, p = patch size, L = patches per
image, K = kept (visible) patches, D = embedding width, H = heads, d = head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _accumulate(t: torch.Tensor) -> torch.Tensor:
    """t in the accumulation precision: float32, or float64 for float64 inputs (the exact reference)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C]; patches row-major, values inside a patch in (i, j, c) order."""
    b, c, h, w = imgs.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = imgs.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, gh*p, gw*p]: the exact inverse of :func:`patchify`."""
    b = x.shape[0]
    p = patch_size
    gh, gw = grid_size
    x = x.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = int(L * (1 - r)): floor, as the release computes it (49 of 196 at r = 0.75)."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """noise [B, L] -> (ids_keep [B, K] int64, ids_restore [B, L] int64, mask [B, L] float32).

    Small noise is kept. Ties are broken by the lower patch index (a stable sort), which is also the
    rule of every kernel. ``mask`` is 0 for kept and 1 for removed patches, in the original order.
    """
    b, length = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(b, length, device=noise.device, dtype=torch.float32)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], ids_keep [B, K] -> [B, K, D] (row b holds x[b, ids_keep[b]])."""
    index = ids_keep.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, index)


def patchify_gather(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] and ids_keep [B, K] -> visible patches [B, K, p*p*C] in (i, j, c) order."""
    return gather_tokens(patchify(imgs, patch_size), ids_keep)


def _patch_rows(pos_embed: torch.Tensor) -> torch.Tensor:
    return pos_embed.reshape(-1, pos_embed.shape[-1])


def patch_embed_gather(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
) -> torch.Tensor:
    """Conv patch embedding of the visible patches only, plus their position rows.

    weight [D, C, p, p] (the Conv2d layout), bias [D] or None, pos_embed [L, D] or [1, L, D] holding the
    patch rows of the table (no cls row) or None. Equals ``gather(conv(imgs) + pos_embed, ids_keep)``.
    """
    p = weight.shape[-1]
    b, c, h, w = imgs.shape
    patches = imgs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, (h // p) * (w // p), c * p * p)  # (c, i, j) order, as the conv weight
    tokens = F.linear(gather_tokens(patches, ids_keep), weight.reshape(weight.shape[0], -1), bias)
    if pos_embed is not None:
        rows = _patch_rows(pos_embed)[ids_keep]  # [B, K, D]
        tokens = tokens + rows.to(tokens.dtype)
    return tokens


def unshuffle_mask_tokens(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor | None
) -> torch.Tensor:
    """Decoder input from the embedded visible tokens, as the release builds it.

    x [B, K+1, Dd] (cls first, then visible tokens in ids_keep order), mask_token [1, 1, Dd] or [Dd],
    ids_restore [B, L], pos_embed [L+1, Dd] or [1, L+1, Dd] (cls row first) or None -> [B, L+1, Dd].
    """
    b, k1, dim = x.shape
    length = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, dim).to(x.dtype).expand(b, length + 1 - k1, dim)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = gather_tokens(x_, ids_restore)
    out = torch.cat([x[:, :1], x_], dim=1)
    if pos_embed is not None:
        out = out + _patch_rows(pos_embed).to(out.dtype)
    return out


def masked_mse_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The MAE loss: per-patch MSE against patchify(imgs), averaged over removed patches (mask == 1).

    With ``norm_pix`` each target patch is normalised by its mean and UNBIASED variance. Computed in
    fp32 whatever pred's dtype (float64 for float64 inputs); returns a 0-d tensor of that precision.
    """
    target = patchify(_accumulate(imgs), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((_accumulate(pred) - target) ** 2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v for q, k, v [B, N, H, d] -> (out [B, N, H, d], lse [B, H, N]).

    Computed in fp32 (float64 for float64 inputs); lse is in that precision, out in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bnhd,bmhd->bhnm", _accumulate(q), _accumulate(k)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("bhnm,bmhd->bnhd", probs, _accumulate(v))
    return out.to(q.dtype), lse


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences: q, k, v [T, H, d], cu_seqlens [S+1] -> (out [T, H, d], lse [H, T]).

    Token t of sequence s attends only to tokens of s (cu_seqlens[s] <= t < cu_seqlens[s+1]).
    """
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            o, s = attention(q[None, start:end], k[None, start:end], v[None, start:end], scale)
            out[start:end] = o[0]
            lse[:, start:end] = s[0]
    return out, lse


def sincos_pos_embed_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin(pos * w_k) for k < dim/2] ++ [cos(pos * w_k) for k < dim/2], w_k = 1 / 10000^(k / (dim/2))."""
    if dim % 2:
        raise ValueError(f"dim must be even for a sin-cos table, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1, 1).double() * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos table [gh*gw (+1), dim] in float32, patches row-major.

    The first dim/2 channels encode the column index, the last dim/2 the row index (what the release
    computes); with ``cls_token`` an all-zero row comes first.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for a 2-D sin-cos table, got {dim}")
    gh, gw = grid_size
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    table = torch.cat([sincos_pos_embed_1d(dim // 2, cols), sincos_pos_embed_1d(dim // 2, rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()


__all__ = [
    "attention",
    "gather_tokens",
    "masked_mse_loss",
    "num_kept",
    "patch_embed_gather",
    "patchify",
    "patchify_gather",
    "random_masking",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "unpatchify",
    "unshuffle_mask_tokens",
    "varlen_attention",
]
