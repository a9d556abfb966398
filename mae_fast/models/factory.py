"""Named model configs: the three official ones and small ones for CPU work and tests."""

from __future__ import annotations

from collections.abc import Callable

from mae_fast.models.mae import MaskedAutoencoderViT

_MODELS: dict[str, Callable[..., MaskedAutoencoderViT]] = {}


def _register(fn: Callable[..., MaskedAutoencoderViT]) -> Callable[..., MaskedAutoencoderViT]:
    _MODELS[fn.__name__] = fn
    return fn


def _build(config: dict, kwargs: dict) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**{**config, **kwargs})


_OFFICIAL_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0)


@_register
def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-B/16 encoder (768 wide, 12 blocks, 12 heads), 512-wide 8-block decoder."""
    return _build(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_OFFICIAL_DECODER), kwargs)


@_register
def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-L/16 encoder (1024 wide, 24 blocks, 16 heads), 512-wide 8-block decoder."""
    return _build(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_OFFICIAL_DECODER), kwargs)


@_register
def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    """ViT-H/14 encoder (1280 wide, 32 blocks, 16 heads), 512-wide 8-block decoder."""
    return _build(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_OFFICIAL_DECODER), kwargs)


@_register
def mae_vit_tiny_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-Tiny-sized encoder (192 wide, 12 blocks, 3 heads) at 224 px, 128-wide 4-block decoder."""
    config = dict(
        patch_size=16, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4
    )
    return _build(config, kwargs)


@_register
def mae_vit_tiny_patch4_32(**kwargs) -> MaskedAutoencoderViT:
    """For 32 px images (64 patches of 4x4): 192 wide, 6 blocks, 3 heads; 128-wide 2-block decoder."""
    config = dict(
        img_size=32,
        patch_size=4,
        embed_dim=192,
        depth=6,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
    )
    return _build(config, kwargs)


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> MaskedAutoencoderViT:
    """Build a named config; keyword arguments override it (img_size, in_chans, norm_pix_loss, backend...)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
