"""random_masking: one stable sort of the noise; the inverse permutation is a scatter, not a second sort."""

import torch

from mae_fast import dispatch
from mae_fast.backends.torch._support import SUPPORT


@dispatch.register("random_masking", "torch", SUPPORT)
def _random_masking(noise, len_keep):
    b, length = noise.shape
    ids_shuffle = torch.sort(noise.detach(), dim=1, stable=True).indices
    positions = torch.arange(length, device=noise.device).expand(b, length)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)
    mask = (ids_restore >= len_keep).to(torch.float32)
    return ids_shuffle[:, :len_keep], ids_restore, mask
