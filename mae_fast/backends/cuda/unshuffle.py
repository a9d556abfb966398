"""unshuffle_mask_tokens on the CUDA kernels of csrc/unshuffle.cu."""

from mae_fast import dispatch
from mae_fast.backends.cuda._library import OPS, SCATTER_LIMITS, support

SUPPORT = support(
    "the CUDA unshuffle kernel",
    backward_maximum={"patches": SCATTER_LIMITS["patches"], "batch": SCATTER_LIMITS["batch"]},
)


@dispatch.register("unshuffle_mask_tokens", "cuda", SUPPORT)
def _unshuffle_mask_tokens(x, mask_token, ids_restore, pos_embed):
    return OPS.unshuffle_mask_tokens(x, mask_token, ids_restore, pos_embed)
