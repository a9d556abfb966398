"""MaskedAutoencoderViT: the MAE of He et al. (2021) with the release's names, running mae_fast's ops."""

from __future__ import annotations

import itertools
from functools import partial

import torch
from torch import nn

from mae_fast import dispatch, ops, reference
from mae_fast.nn import Block, Linear, MaskedReconstructionLoss, PatchEmbedGather
from mae_fast.ops import _validate


def _img_size(value) -> tuple[int, int]:
    """img_size as (H, W): a positive int for square images, or a pair of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        _validate.positive_int(value, "img_size")
        value = (value, value)
    return _validate.int_pair(value, "img_size")


def _check_arguments(
    patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio
) -> None:
    """ValueError naming the first constructor argument out of its range."""
    for name, value in (
        ("patch_size", patch_size),
        ("in_chans", in_chans),
        ("embed_dim", embed_dim),
        ("num_heads", num_heads),
        ("decoder_embed_dim", decoder_embed_dim),
        ("decoder_num_heads", decoder_num_heads),
    ):
        _validate.positive_int(value, name)
    _validate.non_negative_int(depth, "depth")
    _validate.non_negative_int(decoder_depth, "decoder_depth")
    for width_name, width, heads_name, heads in (
        ("embed_dim", embed_dim, "num_heads", num_heads),
        ("decoder_embed_dim", decoder_embed_dim, "decoder_num_heads", decoder_num_heads),
    ):
        if width % heads:
            raise ValueError(
                f"{width_name}={width} must be a multiple of {heads_name}={heads} (head_dim = {width_name} / "
                f"{heads_name} must be a positive int)"
            )
    _validate.positive_finite(mlp_ratio, "mlp_ratio")
    narrowest = min(embed_dim, decoder_embed_dim)
    if int(narrowest * mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio={mlp_ratio} gives an MLP with no hidden unit at width {narrowest}")


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT encoder (visible tokens only) and a light ViT decoder.

    Constructor arguments, method names and state_dict keys are those of the official release, so its
    checkpoints load unchanged. ``img_size`` may be (H, W); ``backend`` picks the kernels ("auto",
    "reference", "torch", "triton", "cuda"; None follows the global default of :mod:`mae_fast.dispatch`).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss: bool = False,
        layer_norm_eps: float | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.img_size = _img_size(img_size)
        _check_arguments(
            patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth, decoder_num_heads,
            mlp_ratio,
        )
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size={patch_size}")
        _validate.flag(norm_pix_loss, "norm_pix_loss")
        dispatch.validate_backend(backend)
        if layer_norm_eps is None:
            eps = _validate.positive_finite(norm_layer(1).eps, "norm_layer's eps")
        else:
            eps = _validate.positive_finite(layer_norm_eps, "layer_norm_eps")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.norm_pix_loss = norm_pix_loss
        self.backend = backend

        # encoder
        self.patch_embed = PatchEmbedGather(patch_size, in_chans, embed_dim, backend=backend)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, eps=eps, backend=backend) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

        # decoder
        self.decoder_embed = Linear(embed_dim, decoder_embed_dim, backend=backend)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, eps=eps, backend=backend)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=eps)
        self.decoder_pred = Linear(decoder_embed_dim, patch_size * patch_size * in_chans, backend=backend)
        self.loss_fn = MaskedReconstructionLoss(patch_size, norm_pix=norm_pix_loss, backend=backend)

        self.initialize_weights()

    # --- initialisation ----------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """The release's init: sin-cos tables, xavier_uniform patch/Linear weights, normal(0.02) tokens."""
        if self.pos_embed.is_meta:
            return
        with torch.no_grad():
            self.pos_embed.copy_(reference.sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size, True)[None])
            self.decoder_pos_embed.copy_(
                reference.sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid_size, True)[None]
            )
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
        elif isinstance(module, nn.LayerNorm):
            nn.init.constant_(module.bias, 0)
            nn.init.constant_(module.weight, 1.0)

    def set_backend(self, backend: str | None) -> None:
        """Switch every op of this model to ``backend`` (None: follow the global default)."""
        dispatch.validate_backend(backend)
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend

    # --- the release's methods -----------------------------------------------------------------------

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C]."""
        return ops.patchify(imgs, self.patch_size, backend=self.backend)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, p*p*C] -> [B, C, H, W]."""
        return ops.unpatchify(x, self.patch_size, self.grid_size, backend=self.backend)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The release's per-sample shuffle: x [B, L, D] -> (x_masked [B, K, D], mask [B, L], ids_restore [B, L])."""
        ids_keep, ids_restore, mask = ops.random_masking(
            x.shape[0], x.shape[1], mask_ratio, noise=noise, device=x.device, backend=self.backend
        )
        return reference.gather_tokens(x, ids_keep), mask, ids_restore

    def _check_images(self, imgs) -> None:
        """imgs [B, C, H, W] of this model's channels and size, and of its dtype unless autocast casts them."""
        _validate.tensor(imgs, "imgs", 4, _validate.FLOAT_DTYPES)
        model_dtype = self.patch_embed.proj.weight.dtype
        if imgs.dtype != model_dtype and not torch.is_autocast_enabled(imgs.device.type):
            raise ValueError(
                f"imgs is {imgs.dtype} but the model's parameters are {model_dtype}: pass imgs.to({model_dtype}), "
                "convert the model, or run under torch.autocast"
            )
        if imgs.shape[1] != self.in_chans:
            raise ValueError(f"imgs must have {self.in_chans} channels, got shape {tuple(imgs.shape)}")
        if tuple(imgs.shape[2:]) != self.img_size:
            raise ValueError(f"imgs must be {self.img_size[0]}x{self.img_size[1]}, got shape {tuple(imgs.shape)}")

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs -> (latent [B, K+1, D], mask [B, L], ids_restore [B, L]); the blocks see visible tokens only."""
        self._check_images(imgs)
        ids_keep, ids_restore, mask = ops.random_masking(
            imgs.shape[0], self.num_patches, mask_ratio, noise=noise, device=imgs.device, backend=self.backend
        )
        x = self.patch_embed(imgs, ids_keep, self.pos_embed[:, 1:])
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, K+1, D] -> pred [B, L, p*p*C] (cls row dropped)."""
        x = self.decoder_embed(latent)
        x = ops.unshuffle_mask_tokens(x, self.mask_token, ids_restore, self.decoder_pos_embed, backend=self.backend)
        return self._decode(x)

    def _decode(self, x: torch.Tensor, removed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Decoder input [B, L+1, Dd] -> pred [B, L, p*p*C].

        With ``removed`` = (token rows into [B*(L+1)], patch rows into [B*L]) of the removed patches, the last
        block's output projection and MLP, the final norm and the head run on those rows only, and pred is
        zero at the other patches: what the loss reads, and nothing else.
        """
        batch, tokens, width = x.shape
        if removed is None:
            for block in self.decoder_blocks:
                x = block(x)
            return self.decoder_pred(self.decoder_norm(x))[:, 1:]
        token_rows, patch_rows = removed
        for block in self.decoder_blocks[:-1]:
            x = block(x)
        if len(self.decoder_blocks):
            x = self.decoder_blocks[-1](x, rows=token_rows)
        else:
            x = x.reshape(-1, width).index_select(0, token_rows)
        out = self.decoder_pred(self.decoder_norm(x))
        pred = out.new_zeros(batch * (tokens - 1), out.shape[-1]).index_copy(0, patch_rows, out)
        return pred.view(batch, tokens - 1, -1)

    @staticmethod
    def _removed_rows(ids_restore: torch.Tensor, kept: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token rows into the decoder's [B*(L+1)] tokens, patch rows into [B*L]) of the removed patches: image b
        removes the patches past the first ``kept`` (or kept[b]) of its shuffle."""
        batch, length = ids_restore.shape
        ids_shuffle = torch.argsort(ids_restore, dim=1)
        image = torch.arange(batch, device=ids_restore.device)[:, None]
        if isinstance(kept, int):
            patches, image = ids_shuffle[:, kept:].reshape(-1), image.expand(-1, length - kept).reshape(-1)
        else:  # per-sample counts, known on the host: pick the removed tail of each image's shuffle
            tail = [b * length + t for b, k in enumerate(kept) for t in range(k, length)]
            tail = torch.tensor(tail, device=ids_restore.device)
            patches, image = ids_shuffle.reshape(-1).index_select(0, tail), tail // length
        return image * (length + 1) + 1 + patches, image * length + patches

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean per-patch MSE over the removed patches (per-patch normalised targets with norm_pix_loss)."""
        return self.loss_fn(pred, imgs, mask)

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | torch.Tensor = 0.75,
        noise: torch.Tensor | None = None,
        return_pred: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """-> (loss, pred [B, L, p*p*C], mask [B, L]); ``noise`` [B, L] fixes the mask.

        ``return_pred=False`` (what the training loop passes) returns (loss, None, mask) and skips the work
        that only pred's kept patches need: the loss reads the removed patches alone, so the last decoder
        block's output projection and MLP, the decoder norm and the head run on those rows only. The loss
        and every gradient are the same (up to rounding); at ViT-B/16 that is ~1/4 of the last block's work.

        A float ``mask_ratio`` must remove at least one patch and keep at least one: it lies in
        (0, 1 - 1/L] up to rounding (K = int(L * (1 - mask_ratio)) must be in [1, L - 1]).
        ``mask_ratio`` may also be a float tensor [B] of per-sample ratios: image b keeps
        int(L * (1 - mask_ratio[b])) patches, the encoder runs on the packed sequences (cls + the kept
        tokens of each image, cu_seqlens) and the loss stays sum(per_patch * mask) / sum(mask) over the batch.
        """
        _validate.flag(return_pred, "return_pred")
        if isinstance(mask_ratio, torch.Tensor):
            return self._forward_per_sample(imgs, mask_ratio, noise, return_pred)
        kept = reference.num_kept(self.num_patches, _validate.mask_ratio(mask_ratio))
        if not 1 <= kept < self.num_patches:
            kept_words = "no patch" if kept < 1 else f"all {kept} patches"
            raise ValueError(self._mask_ratio_range(f"mask_ratio={mask_ratio} keeps {kept_words}"))
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if return_pred:
            pred = self.forward_decoder(latent, ids_restore)
            return self.forward_loss(imgs, pred, mask), pred, mask
        x = self.decoder_embed(latent)
        x = ops.unshuffle_mask_tokens(x, self.mask_token, ids_restore, self.decoder_pos_embed, backend=self.backend)
        pred = self._decode(x, self._removed_rows(ids_restore, kept))
        return self.forward_loss(imgs, pred, mask), None, mask

    def _mask_ratio_range(self, what: str) -> str:
        """The message for a ratio that keeps every patch (the loss has nothing to average) or none."""
        length = self.num_patches
        return (
            f"{what} of {length}: the loss needs at least one removed and one kept patch, so mask_ratio must lie "
            f"in (0, 1 - 1/{length}] = (0, {1 - 1 / length:.6g}] for this model"
        )

    # --- per-sample mask ratios: the encoder on packed variable-length sequences ------------------------

    def _kept_per_sample(self, mask_ratio: torch.Tensor, batch: int) -> tuple[list[int], float]:
        """(K_b = int(L * (1 - mask_ratio[b])), the smallest ratio) for a float tensor [B] of ratios in [0, 1),
        read on the host once."""
        if mask_ratio.dim() != 1 or mask_ratio.shape[0] != batch or not mask_ratio.is_floating_point():
            raise ValueError(
                f"a tensor mask_ratio must be a float tensor of shape [{batch}] (one ratio per image), "
                f"got shape {tuple(mask_ratio.shape)} {mask_ratio.dtype}"
            )
        kept = []
        ratios = mask_ratio.tolist()
        for ratio in ratios:
            _validate.mask_ratio(ratio)
            kept.append(reference.num_kept(self.num_patches, ratio))
            if kept[-1] < 1:
                raise ValueError(f"mask_ratio={ratio} keeps no patch of {self.num_patches}")
        return kept, min(ratios)

    def _forward_per_sample(
        self, imgs: torch.Tensor, mask_ratio: torch.Tensor, noise: torch.Tensor | None, return_pred: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        self._check_images(imgs)
        batch, device = imgs.shape[0], imgs.device
        kept, smallest_ratio = self._kept_per_sample(mask_ratio, batch)
        if min(kept) == self.num_patches:
            raise ValueError(self._mask_ratio_range(f"mask_ratio={mask_ratio.tolist()} keeps all patches"))
        most = max(kept)
        # One shuffle for the whole batch (the same ids as masking each image alone); image b keeps the
        # first K_b patches of its shuffle, so the patches are embedded for the longest K and the extra
        # rows dropped when packing.
        ids_keep, ids_restore, _ = ops.random_masking(
            batch, self.num_patches, smallest_ratio, noise=noise, device=device, backend=self.backend
        )
        kept_t = torch.tensor(kept, device=device)
        mask = (ids_restore >= kept_t[:, None]).float()

        # Which rows of the [B, most + 1] token grid are real (cls + kept tokens), and the sequence offsets: plain
        # Python on the host, so no device sync and nothing data-dependent for a trace.
        rows = torch.tensor([b * (most + 1) + t for b, k in enumerate(kept) for t in range(k + 1)], device=device)
        cu_seqlens = torch.tensor(list(itertools.accumulate((k + 1 for k in kept), initial=0)), device=device)
        cu_seqlens = cu_seqlens.to(torch.int32)

        x = self.patch_embed(imgs, ids_keep, self.pos_embed[:, 1:])
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x.reshape(batch * (most + 1), -1).index_select(0, rows)  # packed [T, D]
        for block in self.blocks:
            x = block(x, cu_seqlens, most + 1)
        latent = self.norm(x)

        # Decoder on the full fixed-length input: the rows an image did not keep become mask tokens.
        y = self.decoder_embed(latent)
        filler = self.mask_token.reshape(1, -1).to(y.dtype).expand(batch * (most + 1), -1)
        y = filler.index_copy(0, rows, y).reshape(batch, most + 1, -1)
        y = ops.unshuffle_mask_tokens(y, self.mask_token, ids_restore, self.decoder_pos_embed, backend=self.backend)
        pred = self._decode(y, None if return_pred else self._removed_rows(ids_restore, kept))
        return self.forward_loss(imgs, pred, mask), pred if return_pred else None, mask

    @torch.no_grad()
    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder features of whole images (nothing masked): [B, L+1, D] after the final norm."""
        self._check_images(imgs)
        ids_all = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
        x = self.patch_embed(imgs, ids_all, self.pos_embed[:, 1:])
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
