"""The "torch" backend: the fastest plain-PyTorch way to run each op, on any device and every float dtype.

"auto" runs it on CPU tensors and as the last fallback on GPUs. Where the reference spells the release's
steps out (a conv over every patch, explicit softmax attention), this backend does the least work that
gives the same result: it gathers only the kept patches before one GEMM, and runs attention through
F.scaled_dot_product_attention (SDPA), whose CPU kernel fuses the softmax. Autograd is PyTorch's own.
"""

from mae_fast.backends.torch import attention, loss, masking, patch_embed, patchify, resized_crop, unshuffle  # noqa: F401
