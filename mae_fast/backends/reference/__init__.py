"""The "reference" backend: the plain PyTorch specification of :mod:`mae_fast.reference`, on any device and
every float dtype (float64 included), differentiable in every input. Tests compare every other backend
against it."""

from mae_fast.backends.reference import attention, loss, masking, patch_embed, patchify, resized_crop, unshuffle  # noqa: F401
