"""A classification ViT on mae_fast's blocks: the release's fine-tuning network, in timm's layout.

Every token (cls + all patches: N = 197 at 224 px for patch 16) goes through mae_fast's patch embedding
and fused attention. Parameter names are timm's ``VisionTransformer`` names, so the state_dict loads into
``timm.models.vision_transformer.VisionTransformer(global_pool="avg", ...)`` (global average pooling over
the patch tokens + ``fc_norm``, the release's default) or ``global_pool="token"`` (cls token + ``norm``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from mae_fast import dispatch
from mae_fast.models.pos_embed import resize_pos_embed, sincos_pos_embed
from mae_fast.nn import Block, Linear, PatchEmbedGather
from mae_fast.ops import _validate

_DECODER_PREFIXES = ("decoder_", "mask_token")
_HEAD_PREFIXES = ("head.",)

#: The encoders of the named MAE configs (and the demo's), for fine-tuning by name.
ENCODERS = {
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
}


class VisionTransformerClassifier(nn.Module):
    """ViT classifier: patch embedding + learned pos_embed (initialised to the sin-cos table), cls token,
    ``depth`` mae_fast Blocks with stochastic depth rising linearly from 0 to ``drop_path_rate`` (as timm),
    then global average pooling of the patch tokens + ``fc_norm`` (``global_pool=True``) or the cls token
    after ``norm``, and the Linear ``head`` (weights trunc_normal(std=2e-5), bias 0, as the release).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        global_pool: bool = True,
        layer_norm_eps: float = 1e-6,
        backend: str | None = None,
    ):
        super().__init__()
        if isinstance(img_size, int) and not isinstance(img_size, bool):
            img_size = (img_size, img_size)
        self.img_size = _validate.int_pair(img_size, "img_size")
        for name, value in (
            ("patch_size", patch_size),
            ("in_chans", in_chans),
            ("num_classes", num_classes),
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
        ):
            _validate.positive_int(value, name)
        _validate.non_negative_int(depth, "depth")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be a multiple of num_heads={num_heads}")
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size={patch_size}")
        if not isinstance(drop_path_rate, (int, float)) or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        _validate.flag(global_pool, "global_pool")
        dispatch.validate_backend(backend)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_path_rate = float(drop_path_rate)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.backend = backend

        self.patch_embed = PatchEmbedGather(patch_size, in_chans, embed_dim, backend=backend)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, eps=layer_norm_eps, backend=backend, drop_path=rate)
                for rate in rates
            ]
        )
        if global_pool:
            self.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
            self.fc_norm = nn.Identity()
        self.head = Linear(embed_dim, num_classes, backend=backend)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        """The MAE init (sin-cos pos_embed, xavier_uniform Linears and patch weights, normal(0.02) cls
        token): "scratch" is the same network as an MAE encoder at its initialisation. Head: trunc_normal(2e-5)."""
        if self.pos_embed.is_meta:
            return
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size))
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        """The names timm and the release keep out of weight decay besides 1-D parameters."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> tokens [B, 1 + L, D] after the blocks (and ``norm`` for cls pooling)."""
        _validate.tensor(imgs, "imgs", 4, _validate.FLOAT_DTYPES)
        if imgs.shape[1] != self.in_chans or tuple(imgs.shape[2:]) != self.img_size:
            raise ValueError(
                f"imgs must be [B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}], got {tuple(imgs.shape)}"
            )
        batch = imgs.shape[0]
        ids_all = torch.arange(self.num_patches, device=imgs.device).expand(batch, -1)
        x = self.patch_embed(imgs, ids_all, self.pos_embed[:, 1:])
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else x[:, 0]
        return self.head(pooled)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> logits [B, num_classes]."""
        return self.forward_head(self.forward_features(imgs))

    def config(self) -> dict:
        """The constructor arguments of this model (what a fine-tuning checkpoint stores to rebuild it)."""
        block = self.blocks[0] if len(self.blocks) else None
        embed_dim = self.cls_token.shape[-1]
        norm = self.fc_norm if self.global_pool else self.norm
        return dict(
            img_size=list(self.img_size),
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            num_classes=self.num_classes,
            embed_dim=embed_dim,
            depth=len(self.blocks),
            num_heads=block.attn.num_heads if block is not None else 1,
            mlp_ratio=(block.mlp.fc1.out_features / embed_dim) if block is not None else 4.0,
            drop_path_rate=self.drop_path_rate,
            global_pool=self.global_pool,
            layer_norm_eps=norm.eps,
        )


def create_classifier(name: str, **kwargs) -> VisionTransformerClassifier:
    """A classifier with the encoder of a named config (:data:`ENCODERS`); keyword arguments override it."""
    if name not in ENCODERS:
        raise ValueError(f"model: unknown classifier {name!r}; known: {', '.join(sorted(ENCODERS))}")
    return VisionTransformerClassifier(**{**ENCODERS[name], **kwargs})


@dataclass
class PretrainedLoad:
    """What :func:`load_pretrained` did: the source's keys it left out and the model's keys it did not fill."""

    dropped_keys: list[str] = field(default_factory=list)
    initialised_keys: list[str] = field(default_factory=list)
    pos_embed_resized: tuple | None = None

    def __str__(self) -> str:
        parts = [f"kept at init: {', '.join(self.initialised_keys) or 'nothing'}"]
        if self.dropped_keys:
            parts.append(f"{len(self.dropped_keys)} keys dropped (decoder / pretraining norm / old head)")
        if self.pos_embed_resized:
            parts.append(f"pos_embed interpolated {self.pos_embed_resized[0]} -> {self.pos_embed_resized[1]}")
        return "; ".join(parts)


def encoder_state_dict(path_or_state) -> dict[str, torch.Tensor]:
    """A ViT encoder state_dict in timm / release names: from an MAE export or training checkpoint of
    mae_fast, the release's ``mae_pretrain_vit_*.pth`` / ``mae_visualize_vit_*.pth`` or a timm ViT (a file
    or a dict), or from transformers' ViTMAE (a model or a ``save_pretrained`` folder, converted by
    :func:`mae_fast.interop.from_transformers`, which needs the folder's config)."""
    from mae_fast.interop._common import state_dict_from

    is_folder = isinstance(path_or_state, (str, os.PathLike)) and os.path.isdir(path_or_state)
    if is_folder or type(path_or_state).__module__.startswith("transformers"):
        from mae_fast.interop import from_transformers

        mae, _ = from_transformers(path_or_state, strict=False)
        return mae.state_dict()
    state = state_dict_from(path_or_state)
    if any(key.startswith("vit.") for key in state):
        raise ValueError(
            "pretrained: a transformers ViTMAE state dict without its config; pass the save_pretrained folder "
            "or the model"
        )
    return state


def load_pretrained(model: VisionTransformerClassifier, path_or_state, argument: str = "pretrained") -> PretrainedLoad:
    """Load pretrained encoder weights into ``model`` for fine-tuning.

    The decoder and the mask token are dropped; with global pooling the pretraining ``norm`` is dropped
    and ``fc_norm`` keeps its initialisation (as the release does); ``head`` is always re-initialised.
    ``pos_embed`` of another grid is interpolated bicubically (the release's ``interpolate_pos_embed``;
    square grids are inferred from the row count). Every other encoder key must be present with the
    model's shape: a checkpoint of another architecture is a ValueError naming ``argument``.
    """
    state = encoder_state_dict(path_or_state)
    own = model.state_dict()
    report = PretrainedLoad()
    keep = {}
    for key, value in state.items():
        drop = key.startswith(_DECODER_PREFIXES + _HEAD_PREFIXES) or key not in own
        if drop:
            report.dropped_keys.append(key)
        else:
            keep[key] = value
    if "patch_embed.proj.weight" not in keep or "pos_embed" not in keep:
        raise ValueError(f"{argument}: the checkpoint holds no ViT encoder (no patch_embed.proj.weight / pos_embed)")
    pos = keep["pos_embed"]
    if pos.shape != own["pos_embed"].shape and pos.ndim == 3 and pos.shape[-1] == own["pos_embed"].shape[-1]:
        side = int(round((pos.shape[1] - 1) ** 0.5))
        if side * side == pos.shape[1] - 1:
            keep["pos_embed"] = resize_pos_embed(pos, (side, side), model.grid_size)
            report.pos_embed_resized = ((side, side), model.grid_size)
    for key, value in keep.items():
        if own[key].shape != value.shape:
            raise ValueError(
                f"{argument}: checkpoint key {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(own[key].shape)} (a checkpoint of another architecture?)"
            )
    wanted = {key for key in own if not key.startswith(_HEAD_PREFIXES + ("fc_norm.",))}
    missing = sorted(wanted - set(keep))
    if missing:
        raise ValueError(
            f"{argument}: the checkpoint lacks {len(missing)} encoder keys of the model, e.g. "
            f"{', '.join(missing[:4])} (a checkpoint of another architecture or depth?)"
        )
    model.load_state_dict(keep, strict=False)
    report.initialised_keys = sorted(set(own) - set(keep))
    return report


def to_timm_vit(model: VisionTransformerClassifier) -> nn.Module:
    """A timm ``VisionTransformer`` holding ``model``'s weights (loaded strictly; same device and dtype)."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    cfg = model.config()
    vit = VisionTransformer(
        img_size=tuple(cfg["img_size"]),
        patch_size=cfg["patch_size"],
        in_chans=cfg["in_chans"],
        num_classes=cfg["num_classes"],
        global_pool="avg" if cfg["global_pool"] else "token",
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        qkv_bias=True,
        drop_path_rate=cfg["drop_path_rate"],
        norm_layer=partial(nn.LayerNorm, eps=cfg["layer_norm_eps"]),
    )
    vit.load_state_dict(model.state_dict(), strict=True)
    return vit.to(device=model.cls_token.device, dtype=model.cls_token.dtype)

