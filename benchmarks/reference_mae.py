"""The peer of the end-to-end benchmark: MAE with the release's semantics in plain PyTorch.

Written the way the authors' release and timm write it: the patch embedding is a Conv2d over ALL
patches, masking is an argsort of the noise followed by torch.gather, attention is timm's (fused
``qkv`` Linear, heads split, F.scaled_dot_product_attention, ``proj``), the decoder input is built with
cat + gather + add, and the loss patchifies with einsum. It uses nothing from mae_fast, holds the
same state_dict keys as :class:`mae_fast.models.MaskedAutoencoderViT`, and gives the same loss for the
same weights and noise (tested in tests/test_bench.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_table(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + gh*gw, dim] float32: a zero cls row, then per patch (row r, column c) the 1-D sin-cos code of c
    in the first dim/2 channels and of r in the last dim/2 (each [sin(pos*w_k)] ++ [cos(pos*w_k)],
    w_k = 10000^(-k / (dim/4)))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")

    def code(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1).double() * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([code(cols), code(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ReferenceMAE(nn.Module):
    """MAE of the release: forward(imgs [B, C, H, W], mask_ratio, noise [B, L] or None) -> (loss, pred, mask)."""

    def __init__(
        self,
        img_size: tuple[int, int] = (224, 224),
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        num_patches = self.grid[0] * self.grid[1]
        self.norm_pix_loss = norm_pix_loss
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_table(embed_dim, self.grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_table(decoder_embed_dim, self.grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, eps) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self.num_patches = num_patches
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(embed_dim, -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def like(cls, model: nn.Module) -> ReferenceMAE:
        """A ReferenceMAE with the config and weights of a mae_fast MaskedAutoencoderViT."""
        enc, dec = model.blocks[0], model.decoder_blocks[0]
        dim = model.patch_embed.proj.out_channels
        ref = cls(
            img_size=model.img_size,
            patch_size=model.patch_size,
            in_chans=model.in_chans,
            embed_dim=dim,
            depth=len(model.blocks),
            num_heads=enc.attn.num_heads,
            decoder_embed_dim=model.decoder_embed.out_features,
            decoder_depth=len(model.decoder_blocks),
            decoder_num_heads=dec.attn.num_heads,
            mlp_ratio=enc.mlp.fc1.out_features / dim,
            norm_pix_loss=model.norm_pix_loss,
            eps=model.norm.eps,
        )
        ref.load_state_dict(model.state_dict())
        return ref.to(next(model.parameters()).device)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        p, (gh, gw) = self.patch_size, self.grid
        x = imgs.reshape(imgs.shape[0], imgs.shape[1], gh, p, gw, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], gh * gw, -1)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None):
        b, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(b, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, dim))
        mask = torch.ones(b, length, device=x.device)
        mask[:, :len_keep] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        b, length = ids_restore.shape
        mask_tokens = self.mask_token.repeat(b, length + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def train_flops_per_image(
    num_patches: int,
    kept: int,
    patch_dim: int,
    embed_dim: int,
    depth: int,
    decoder_embed_dim: int,
    decoder_depth: int,
    mlp_ratio: float = 4.0,
) -> int:
    """Matmul FLOPs of one MAE training step per image (forward x 3), counting the useful work only.

    Per block on N tokens of width D: 2*N*D*(3D + D + 2*mlp_ratio*D) for the Linears plus 4*N^2*D for
    q k^T and p v. Patch embedding on the ``kept`` visible patches (the release's conv on all patches
    counts as wasted work), decoder_embed on K+1 tokens, decoder_pred on L+1. Backward = 2x forward,
    except the patch embedding's (the images need no gradient: only the weight gradient, 1x).
    """
    hidden = int(embed_dim * mlp_ratio)
    dec_hidden = int(decoder_embed_dim * mlp_ratio)

    def blocks(n: int, dim: int, hid: int, count: int) -> int:
        return count * (2 * n * dim * (4 * dim + 2 * hid) + 4 * n * n * dim)

    n_enc, n_dec = kept + 1, num_patches + 1
    patch_embed = 2 * kept * patch_dim * embed_dim
    rest = (
        blocks(n_enc, embed_dim, hidden, depth)
        + 2 * n_enc * embed_dim * decoder_embed_dim
        + blocks(n_dec, decoder_embed_dim, dec_hidden, decoder_depth)
        + 2 * n_dec * decoder_embed_dim * patch_dim
    )
    return 2 * patch_embed + 3 * rest


def model_train_flops_per_image(model: nn.Module, mask_ratio: float = 0.75) -> int:
    """:func:`train_flops_per_image` for a mae_fast MaskedAutoencoderViT or a ReferenceMAE."""
    proj = model.patch_embed.proj
    num_patches = model.num_patches
    return train_flops_per_image(
        num_patches=num_patches,
        kept=int(num_patches * (1 - mask_ratio)),
        patch_dim=proj.in_channels * math.prod(proj.kernel_size),
        embed_dim=proj.out_channels,
        depth=len(model.blocks),
        decoder_embed_dim=model.decoder_embed.out_features,
        decoder_depth=len(model.decoder_blocks),
        mlp_ratio=model.blocks[0].mlp.fc1.out_features / proj.out_channels,
    )
