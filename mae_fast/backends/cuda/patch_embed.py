"""patch_embed_gather on the CUDA kernels of csrc/patch_gather.cu (gather, then one GEMM over the kept patches).

Inside the C++ op autocast is off, so its output always has the dtype of the imgs it is given, as the
primitive's fake says; under autocast the inputs are cast to its dtype here first.
"""

from mae_fast import dispatch
from mae_fast.backends.cuda._library import OPS, SCATTER_LIMITS, support
from mae_fast.ops.patch_embed import cast_for_autocast, one_dtype_reason


def _one_dtype(imgs, ids_keep, weight, bias, pos_embed) -> str | None:
    return one_dtype_reason(imgs, weight, bias)


SUPPORT = support("the CUDA patch-embedding kernel", backward_maximum=SCATTER_LIMITS, extra=_one_dtype)


@dispatch.register("patch_embed_gather", "cuda", SUPPORT)
def _patch_embed_gather(imgs, ids_keep, weight, bias, pos_embed):
    imgs, weight, bias = cast_for_autocast(imgs, weight, bias)
    return OPS.patch_embed_gather(imgs, ids_keep, weight, bias, pos_embed)
