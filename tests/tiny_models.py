"""The suite's one tiny MAE, and its timm and transformers twins: 16x16 images, 16 patches of 4x4, a 2-block
32-wide encoder with 2 heads, a 1-block 16-wide decoder with 2 heads. A test that depends on other sizes
passes them as overrides, so that each one says what it changes."""

from mae_fast.models import MaskedAutoencoderViT

TINY_ENCODER = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
TINY_DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny_mae(**overrides) -> MaskedAutoencoderViT:
    """The tiny MAE on the reference backend; keyword arguments override its config."""
    return MaskedAutoencoderViT(**{**TINY_ENCODER, **TINY_DECODER, "backend": "reference", **overrides})


def tiny_timm_vit(**overrides):
    """timm's VisionTransformer with the tiny encoder and a 5-class head, in eval mode."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**{**TINY_ENCODER, "num_classes": 5, **overrides}).eval()


def tiny_vitmae_config(**overrides):
    """transformers' ViTMAEConfig of the tiny MAE (MLP ratio 4, 3 channels)."""
    from transformers import ViTMAEConfig

    config = dict(
        hidden_size=TINY_ENCODER["embed_dim"],
        num_hidden_layers=TINY_ENCODER["depth"],
        num_attention_heads=TINY_ENCODER["num_heads"],
        intermediate_size=4 * TINY_ENCODER["embed_dim"],
        image_size=TINY_ENCODER["img_size"],
        patch_size=TINY_ENCODER["patch_size"],
        num_channels=3,
        decoder_hidden_size=TINY_DECODER["decoder_embed_dim"],
        decoder_num_hidden_layers=TINY_DECODER["decoder_depth"],
        decoder_num_attention_heads=TINY_DECODER["decoder_num_heads"],
        decoder_intermediate_size=4 * TINY_DECODER["decoder_embed_dim"],
    )
    return ViTMAEConfig(**{**config, **overrides})
