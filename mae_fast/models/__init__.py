"""MAE models: the release's MaskedAutoencoderViT, named configs and checkpoint loading."""

from mae_fast.models.checkpoint import LoadReport, load_checkpoint, read_state_dict
from mae_fast.models.factory import (
    create_model,
    list_models,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_tiny_patch4_32,
    mae_vit_tiny_patch16,
)
from mae_fast.models.mae import MaskedAutoencoderViT

__all__ = [
    "LoadReport",
    "MaskedAutoencoderViT",
    "create_model",
    "list_models",
    "load_checkpoint",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "mae_vit_tiny_patch16",
    "mae_vit_tiny_patch4_32",
    "read_state_dict",
]
