"""The "cuda" backend: the CUDA C++ kernels of ``csrc/``, compiled into ``mae_fast._C``.

Each op module declares what its kernels support and registers the op with the dispatcher; the kernels
implement the primitives under the ``mae_fast`` namespace (``_library``)."""

from mae_fast.backends.cuda import attention, loss, masking, patch_embed, patchify, unshuffle  # noqa: F401
