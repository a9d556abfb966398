"""Interop: the release's, transformers' and timm's checkpoints in and out; mae_fast's attention in other ViTs.

Nothing here imports timm or transformers until a function that needs them is called.
"""

from mae_fast.interop._common import ConversionReport
from mae_fast.interop.official import from_official, to_official
from mae_fast.interop.patching import PatchReport, TimmAttention, TransformersAttention, patch
from mae_fast.interop.timm import from_timm, timm_vit, to_timm
from mae_fast.interop.transformers import from_transformers, to_transformers, transformers_state_dict

__all__ = [
    "ConversionReport",
    "PatchReport",
    "TimmAttention",
    "TransformersAttention",
    "from_official",
    "from_timm",
    "from_transformers",
    "patch",
    "timm_vit",
    "to_official",
    "to_timm",
    "to_transformers",
    "transformers_state_dict",
]
