"""random_masking on the CUDA kernel of csrc/random_masking.cu (one row sorted in shared memory)."""

from mae_fast import dispatch
from mae_fast.backends.cuda._library import OPS, support

MAX_PATCHES = 1024
SUPPORT = support("the CUDA masking kernel", maximum={"patches": MAX_PATCHES})


@dispatch.register("random_masking", "cuda", SUPPORT)
def _random_masking(noise, len_keep):
    return OPS.random_masking(noise.detach(), len_keep)
