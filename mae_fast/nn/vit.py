"""ViT building blocks with the parameter names of timm and the MAE release, running mae_fast's ops."""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from mae_fast import ops
from mae_fast.nn.linear import Linear
from mae_fast.ops.attention import qkv_attention


class Attention(nn.Module):
    """Multi-head self-attention: one fused ``qkv`` Linear (D -> 3D), ``proj`` (D -> D).

    Drop-in for timm's ``Attention`` (same parameter names and shapes). Besides [B, N, D] it accepts
    packed tokens [T, D] with int32 ``cu_seqlens`` [S+1] (and the longest length ``max_seqlen``, a Python
    int) for sequences of different lengths. The qkv output goes to the attention op as it is and the
    op returns [.., D] for ``proj``: no transpose or copy around the kernel. ``rows`` (int64 indices into the
    tokens flattened to [B*N, D] or [T, D]) makes ``proj`` run on those tokens only and the output [len(rows), D].
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, backend: str | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias, backend=backend)
        self.proj = Linear(dim, dim, backend=backend)
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = qkv_attention(self.qkv(x), self.num_heads, cu_seqlens, max_seqlen, self.scale, backend=self.backend)
        if rows is not None:
            out = out.reshape(-1, out.shape[-1]).index_select(0, rows)
        return self.proj(out)


class Mlp(nn.Module):
    """fc1 (D -> hidden), exact (erf) GELU, fc2 (hidden -> D)."""

    def __init__(self, dim: int, hidden_dim: int, backend: str | None = None):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim, backend=backend)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path1(attn(norm1(x))), then x + drop_path2(mlp(norm2(x)));
    timm's names and weights. ``drop_path`` (stochastic depth, 0 by default: pretraining runs without it)
    is the probability of dropping each residual branch per sample in training (timm's ``DropPath``).

    x is [B, N, D], or packed [T, D] with int32 ``cu_seqlens`` [S+1] and ``max_seqlen`` (see Attention).
    Packed tokens have no sample dim, so training with ``drop_path > 0`` needs [B, N, D] input.
    ``rows`` (int64 indices into the tokens flattened to [B*N, D] or [T, D]) returns those tokens' outputs
    only, [len(rows), D]: every token still feeds the attention's keys and values, but the output projection,
    the residuals and the MLP run on the chosen rows alone (the MAE decoder's last block, whose other
    outputs the loss never reads).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        backend: str | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=backend)
        self.drop_path1 = DropPath(drop_path) if drop_path else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), backend=backend)
        self.drop_path2 = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.training and self.drop_path and (x.ndim == 2 or rows is not None):
            what = "packed [T, D] tokens" if rows is None else "the rows= selection"
            raise ValueError(
                f"drop_path={self.drop_path} in training needs [B, N, D] input and output; {what} has no "
                "sample dim to drop per sample (use drop_path=0 or call eval())"
            )
        attended = self.attn(self.norm1(x), cu_seqlens, max_seqlen, rows)
        if rows is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, rows)
        x = x + self.drop_path1(attended)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchEmbedGather(nn.Module):
    """Patch embedding of the visible patches only, with the position rows added, in one op.

    Holds ``proj`` as the release's Conv2d (kernel = stride = p), so ``patch_embed.proj.weight`` and
    ``.bias`` load unchanged; forward never runs the convolution over the hidden patches.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, backend: str | None = None):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.backend = backend

    def forward(
        self, imgs: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None
    ) -> torch.Tensor:
        return ops.patch_embed_gather(imgs, ids_keep, self.proj.weight, self.proj.bias, pos_embed, backend=self.backend)


class MaskedReconstructionLoss(nn.Module):
    """The MAE loss as a module: forward(pred, imgs, mask) -> 0-d fp32 loss (see ops.masked_mse_loss)."""

    def __init__(self, patch_size: int, norm_pix: bool = True, eps: float = 1e-6, backend: str | None = None):
        super().__init__()
        self.patch_size = patch_size
        self.norm_pix = norm_pix
        self.eps = eps
        self.backend = backend

    def forward(self, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ops.masked_mse_loss(pred, imgs, mask, self.patch_size, self.norm_pix, self.eps, backend=self.backend)
