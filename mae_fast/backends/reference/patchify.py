"""patchify, unpatchify and patchify_gather: the reference."""

from mae_fast import dispatch, reference
from mae_fast.backends.reference._support import SUPPORT

dispatch.register("patchify", "reference", SUPPORT)(reference.patchify)
dispatch.register("patchify_gather", "reference", SUPPORT)(reference.patchify_gather)


@dispatch.register("unpatchify", "reference", SUPPORT)
def _unpatchify(x, patch_size, grid_size):
    channels = x.shape[2] // (patch_size * patch_size)
    return reference.unpatchify(x, patch_size, grid_size, channels)
