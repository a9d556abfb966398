// Host entry points of the CUDA kernels; registered under torch.ops.mae_fast in mae_fast.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace mae_fast {

// [B, C, H, W] -> [B, L, p*p*C], patches row-major, (i, j, c) order inside a patch.
at::Tensor patchify_cuda(const at::Tensor& imgs, int64_t patch_size);
// [B, L, p*p*C] -> [B, C, grid_h*p, grid_w*p], the inverse of patchify.
at::Tensor unpatchify_cuda(const at::Tensor& patches, int64_t patch_size, int64_t grid_h, int64_t grid_w);

}  // namespace mae_fast
