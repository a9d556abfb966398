"""patchify, unpatchify and patchify_gather on the CUDA kernels of csrc/patchify.cu and csrc/patch_gather.cu."""

from mae_fast import dispatch
from mae_fast.backends.cuda._library import OPS, SCATTER_LIMITS, support

PATCHIFY = support("the CUDA patchify kernel")
GATHER = support("the CUDA gather kernel", backward_maximum=SCATTER_LIMITS)


@dispatch.register("patchify", "cuda", PATCHIFY)
def _patchify(imgs, patch_size):
    return OPS.patchify(imgs, patch_size)


@dispatch.register("unpatchify", "cuda", PATCHIFY)
def _unpatchify(x, patch_size, grid_size):
    return OPS.unpatchify(x, patch_size, *grid_size)


@dispatch.register("patchify_gather", "cuda", GATHER)
def _patchify_gather(imgs, ids_keep, patch_size):
    return OPS.gather_patches(imgs, ids_keep, patch_size, True)
