"""The public hot ops. Each validates its inputs and runs through :mod:`mae_fast.dispatch`."""

from mae_fast import _extension
from mae_fast.ops import cuda_backends  # noqa: F401  (registers the "cuda" backends)
from mae_fast.ops.attention import visible_attention
from mae_fast.ops.loss import masked_mse_loss
from mae_fast.ops.masking import random_masking
from mae_fast.ops.patch_embed import patch_embed_gather
from mae_fast.ops.patchify import patchify, patchify_gather, unpatchify
from mae_fast.ops.unshuffle import unshuffle_mask_tokens

__all__ = [
    "masked_mse_loss",
    "patch_embed_gather",
    "patchify",
    "patchify_gather",
    "random_masking",
    "unpatchify",
    "unshuffle_mask_tokens",
    "visible_attention",
]

# Load the CUDA extension now, outside any torch.compile trace, so the backends' checks only read state.
_extension.load()
