"""patch_embed_gather: the reference (a conv over every patch, then the gather)."""

from mae_fast import dispatch, reference
from mae_fast.backends.reference._support import SUPPORT

dispatch.register("patch_embed_gather", "reference", SUPPORT)(reference.patch_embed_gather)
