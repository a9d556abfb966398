"""unshuffle_mask_tokens: the release's cat + gather + add is already the plain-PyTorch minimum."""

from mae_fast import dispatch, reference
from mae_fast.backends.torch._support import SUPPORT

dispatch.register("unshuffle_mask_tokens", "torch", SUPPORT)(reference.unshuffle_mask_tokens)
