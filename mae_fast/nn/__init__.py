"""Drop-in modules built on mae_fast's ops."""

from mae_fast.nn.linear import Linear
from mae_fast.nn.vit import Attention, Block, MaskedReconstructionLoss, Mlp, PatchEmbedGather

__all__ = ["Attention", "Block", "Linear", "MaskedReconstructionLoss", "Mlp", "PatchEmbedGather"]
