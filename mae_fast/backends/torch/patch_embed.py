"""patch_embed_gather: the kept patches in the Conv2d weight's order, then one GEMM over them only (the
reference convolves every patch and gathers afterwards: four times the FLOPs at mask ratio 0.75)."""

from mae_fast import cpu_gemm, dispatch
from mae_fast.backends.torch._support import SUPPORT
from mae_fast.backends.torch.patchify import gather_patches


@dispatch.register("patch_embed_gather", "torch", SUPPORT)
def _patch_embed_gather(imgs, ids_keep, weight, bias, pos_embed):
    patches = gather_patches(imgs, ids_keep, weight.shape[-1], False)
    tokens = cpu_gemm.linear(patches, weight.flatten(1), bias)
    if pos_embed is not None:
        # index_select's backward is index_add_ over rows, several times faster on the CPU than the
        # accumulating index_put_ that advanced indexing's backward runs (a learned pos_embed: fine-tuning)
        rows = pos_embed.reshape(-1, pos_embed.shape[-1]).index_select(0, ids_keep.reshape(-1))
        tokens = tokens + rows.view(*ids_keep.shape, -1).to(tokens.dtype)
    return tokens
