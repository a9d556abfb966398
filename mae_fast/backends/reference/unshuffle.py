"""unshuffle_mask_tokens: the reference (cat + gather + add)."""

from mae_fast import dispatch, reference
from mae_fast.backends.reference._support import SUPPORT

dispatch.register("unshuffle_mask_tokens", "reference", SUPPORT)(reference.unshuffle_mask_tokens)
