"""The "cuda" backend of each op: the kernels of the compiled extension ``mae_fast._C``.

The ops' fake implementations and autograd formulas are registered in ``_cuda_registrations`` once
the extension loads; here each op only tells the dispatcher when the extension can run its inputs.
"""

from __future__ import annotations

import torch

from mae_fast import dispatch


def _check(x: torch.Tensor, *args) -> str | None:
    reason = dispatch.cuda_extension_unavailable(x)
    if reason is None and x.dtype == torch.float64:
        return "float64 is not compiled into the CUDA kernels"
    return reason


@dispatch.register("patchify", "cuda", check=_check)
def _patchify(imgs, patch_size):
    return torch.ops.mae_fast.patchify(imgs, patch_size)


@dispatch.register("unpatchify", "cuda", check=_check)
def _unpatchify(x, patch_size, grid_size):
    return torch.ops.mae_fast.unpatchify(x, patch_size, grid_size[0], grid_size[1])
