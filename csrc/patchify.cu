// patchify / unpatchify of an image batch: one thread per output element, 64-bit indexing.
#include "dispatch.h"
#include "ops.h"

#include <ATen/ops/empty.h>

namespace mae_fast {
namespace {

constexpr int kThreads = 256;

// out[b, l, (i*p + j)*C + c] = imgs[b, c, r*p + i, s*p + j] with l = r*grid_w + s.
template <typename scalar_t>
__global__ void patchify_kernel(const scalar_t* __restrict__ imgs, scalar_t* __restrict__ out, int64_t total,
                                int64_t channels, int64_t p, int64_t grid_h, int64_t grid_w) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t c = idx % channels;
  int64_t rest = idx / channels;
  const int64_t j = rest % p;
  rest /= p;
  const int64_t i = rest % p;
  rest /= p;
  const int64_t s = rest % grid_w;
  rest /= grid_w;
  const int64_t r = rest % grid_h;
  const int64_t b = rest / grid_h;
  const int64_t height = grid_h * p, width = grid_w * p;
  out[idx] = imgs[((b * channels + c) * height + r * p + i) * width + s * p + j];
}

// imgs[b, c, y, x] = patches[b, (y/p)*grid_w + x/p, ((y%p)*p + x%p)*C + c]; coalesced writes.
template <typename scalar_t>
__global__ void unpatchify_kernel(const scalar_t* __restrict__ patches, scalar_t* __restrict__ imgs, int64_t total,
                                  int64_t channels, int64_t p, int64_t grid_h, int64_t grid_w) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t width = grid_w * p, height = grid_h * p;
  const int64_t x = idx % width;
  int64_t rest = idx / width;
  const int64_t y = rest % height;
  rest /= height;
  const int64_t c = rest % channels;
  const int64_t b = rest / channels;
  const int64_t l = (y / p) * grid_w + x / p;
  const int64_t inner = ((y % p) * p + x % p) * channels + c;
  imgs[idx] = patches[(b * grid_h * grid_w + l) * p * p * channels + inner];
}

int blocks_for(int64_t total) { return static_cast<int>(ceil_div(total, kThreads)); }

}  // namespace

at::Tensor patchify_cuda(const at::Tensor& imgs_in, int64_t patch_size) {
  MAE_FAST_CHECK_CUDA(imgs_in, "imgs");
  TORCH_CHECK(imgs_in.dim() == 4, "imgs must be [B, C, H, W], got ", imgs_in.sizes());
  TORCH_CHECK(patch_size > 0, "patch_size must be positive, got ", patch_size);
  TORCH_CHECK(imgs_in.size(2) % patch_size == 0 && imgs_in.size(3) % patch_size == 0,
              "imgs height and width must be divisible by patch_size=", patch_size, ", got ", imgs_in.sizes());
  const c10::cuda::CUDAGuard guard(imgs_in.device());
  const at::Tensor imgs = imgs_in.contiguous();
  const int64_t batch = imgs.size(0), channels = imgs.size(1);
  const int64_t grid_h = imgs.size(2) / patch_size, grid_w = imgs.size(3) / patch_size;
  at::Tensor out = at::empty({batch, grid_h * grid_w, patch_size * patch_size * channels}, imgs.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  MAE_FAST_DISPATCH_FLOATING(imgs.scalar_type(), "patchify_cuda", [&] {
    patchify_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        imgs.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, channels, patch_size, grid_h,
        grid_w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor unpatchify_cuda(const at::Tensor& patches_in, int64_t patch_size, int64_t grid_h, int64_t grid_w) {
  MAE_FAST_CHECK_CUDA(patches_in, "patches");
  TORCH_CHECK(patches_in.dim() == 3, "patches must be [B, L, p*p*C], got ", patches_in.sizes());
  TORCH_CHECK(patch_size > 0 && grid_h > 0 && grid_w > 0, "patch_size and grid must be positive");
  TORCH_CHECK(patches_in.size(1) == grid_h * grid_w, "patches has ", patches_in.size(1), " patches, the grid ",
              grid_h, "x", grid_w, " needs ", grid_h * grid_w);
  TORCH_CHECK(patches_in.size(2) % (patch_size * patch_size) == 0, "patches last dimension ", patches_in.size(2),
              " is not a multiple of patch_size**2");
  const c10::cuda::CUDAGuard guard(patches_in.device());
  const at::Tensor patches = patches_in.contiguous();
  const int64_t channels = patches.size(2) / (patch_size * patch_size);
  at::Tensor imgs = at::empty({patches.size(0), channels, grid_h * patch_size, grid_w * patch_size}, patches.options());
  const int64_t total = imgs.numel();
  if (total == 0) return imgs;
  MAE_FAST_DISPATCH_FLOATING(patches.scalar_type(), "unpatchify_cuda", [&] {
    unpatchify_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        patches.const_data_ptr<scalar_t>(), imgs.mutable_data_ptr<scalar_t>(), total, channels, patch_size, grid_h,
        grid_w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return imgs;
}

}  // namespace mae_fast
