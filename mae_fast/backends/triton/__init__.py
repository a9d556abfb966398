"""The "triton" backend: the Triton kernels of ``kernels/`` (installed as ``mae_fast.kernels``).

Each op module implements its op's primitives under the ``mae_fast_triton`` namespace (for CUDA tensors,
and for CPU tensors under TRITON_INTERPRET=1) and registers the op with its support declaration."""

from mae_fast.backends.triton import attention, loss, masking, patch_embed, patchify, resized_crop, unshuffle  # noqa: F401
