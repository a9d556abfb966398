"""The public hot ops. Each validates its inputs and runs through :mod:`mae_fast.dispatch`.

Importing this package declares every op and its primitives; the backends (:mod:`mae_fast.backends`,
loaded by ``import mae_fast``) register their implementations.
"""

from mae_fast.ops.attention import qkv_attention, visible_attention
from mae_fast.ops.loss import masked_mse_loss
from mae_fast.ops.masking import random_masking
from mae_fast.ops.patch_embed import patch_embed_gather
from mae_fast.ops.patchify import patchify, patchify_gather, unpatchify
from mae_fast.ops.resized_crop import resized_crop
from mae_fast.ops.unshuffle import unshuffle_mask_tokens

__all__ = [
    "masked_mse_loss",
    "patch_embed_gather",
    "patchify",
    "patchify_gather",
    "qkv_attention",
    "random_masking",
    "resized_crop",
    "unpatchify",
    "unshuffle_mask_tokens",
    "visible_attention",
]
