// masked_mse_loss: the MAE loss and its gradient in one pass over pred and the removed patches.
//
// One warp per patch: the target patch is read straight from the NCHW image (coalesced along image rows)
// into shared memory in (i, j, c) order, normalised with its mean and UNBIASED variance (two passes over
// shared memory, fp32), compared with pred, and d loss / d pred written right away. Patches with
// mask == 0 contribute nothing and are not read. All reductions run in a fixed order (warp shuffles, one
// final single-block sum): the result is bitwise reproducible.
//
// The saved gradient: for float and bfloat16 the final d loss / d pred for an upstream gradient of 1
// (2 * mask * (pred - target) / (N * mask_sum)). For half that product is often subnormal (residuals of
// 1e-2 over 196 patches of 768 values) and is rounded or flushed before a GradScaler's factor could lift
// it, so half saves the O(1) residual mask * (pred - target) and the backward primitives (cuda/_library.py)
// apply 2 * grad_loss / (N * mask_sum) in fp32, as the Triton kernel does.
#include "dispatch.h"
#include "ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <type_traits>

namespace mae_fast {
namespace {

constexpr int kWarpsMax = 8;
constexpr int kSumThreads = 1024;
constexpr int64_t kSharedBudget = 48 * 1024;

// out[0] = sum(in[0:n]) / (divisor ? divisor[0] : 1), in one block and a fixed order.
__global__ void ordered_sum_kernel(const float* __restrict__ in, int64_t n, const float* __restrict__ divisor,
                                   float* __restrict__ out) {
  __shared__ float partial[kSumThreads / 32];
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += in[i];
  acc = warp_sum(acc);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.f;
    acc = warp_sum(acc);
    if (lane == 0) out[0] = divisor == nullptr ? acc : acc / divisor[0];
  }
}

struct LossGeometry {
  int64_t patches;  // B * L
  int64_t length, channels, height, width, p, grid_w, patch_numel;
};

template <typename P, typename I>
__global__ void masked_mse_patch_kernel(const P* __restrict__ pred, const I* __restrict__ imgs,
                                        const float* __restrict__ mask, const float* __restrict__ mask_sum,
                                        P* __restrict__ grad, float* __restrict__ per_patch, LossGeometry g,
                                        bool norm_pix, float eps) {
  extern __shared__ float loss_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps = blockDim.x / 32;
  float* target = loss_smem + static_cast<int64_t>(warp) * g.patch_numel;
  const int64_t pp = g.p * g.p;
  const float n = static_cast<float>(g.patch_numel);
  for (int64_t patch = static_cast<int64_t>(blockIdx.x) * warps + warp; patch < g.patches;
       patch += static_cast<int64_t>(gridDim.x) * warps) {
    const float weight = mask[patch];
    P* grad_row = grad + patch * g.patch_numel;
    if (weight == 0.f) {
      for (int64_t e = lane; e < g.patch_numel; e += 32) grad_row[e] = from_float<P>(0.f);
      if (lane == 0) per_patch[patch] = 0.f;
      continue;
    }
    const int64_t b = patch / g.length, l = patch % g.length;
    const int64_t r = l / g.grid_w, s = l % g.grid_w;
    const I* img = imgs + (b * g.channels * g.height + r * g.p) * g.width + s * g.p;
    // Image order (c, i, j) for coalesced reads; stored in the patchify order (i, j, c).
    float sum = 0.f;
    for (int64_t e = lane; e < g.patch_numel; e += 32) {
      const int64_t c = e / pp, ij = e % pp, i = ij / g.p, j = ij % g.p;
      const float t = to_float(img[(c * g.height + i) * g.width + j]);
      target[ij * g.channels + c] = t;
      sum += t;
    }
    __syncwarp();
    float mean = 0.f, inv_std = 1.f;
    if (norm_pix) {
      mean = warp_sum(sum) / n;
      float sq = 0.f;
      for (int64_t e = lane; e < g.patch_numel; e += 32) {
        const float d = target[e] - mean;
        sq += d * d;
      }
      const float var = warp_sum(sq) / (n - 1.f);
      inv_std = 1.f / sqrtf(var + eps);
    }
    constexpr bool kSavesResidual = std::is_same_v<P, at::Half>;
    const float grad_scale = kSavesResidual ? weight : 2.f * weight / (n * mask_sum[0]);
    const P* pred_row = pred + patch * g.patch_numel;
    float err = 0.f;
    for (int64_t e = lane; e < g.patch_numel; e += 32) {
      const float d = to_float(pred_row[e]) - (target[e] - mean) * inv_std;
      err += d * d;
      grad_row[e] = from_float<P>(d * grad_scale);
    }
    err = warp_sum(err);
    if (lane == 0) per_patch[patch] = err / n * weight;
    __syncwarp();  // target is overwritten by this warp's next patch
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_mse_loss_cuda(const at::Tensor& pred_in,
                                                                    const at::Tensor& imgs_in, const at::Tensor& mask_in,
                                                                    int64_t patch_size, bool norm_pix, double eps,
                                                                    bool store_grad) {
  MAE_FAST_CHECK_CUDA(pred_in, "pred");
  MAE_FAST_CHECK_SAME_DEVICE(imgs_in, pred_in, "imgs", "pred");
  MAE_FAST_CHECK_SAME_DEVICE(mask_in, pred_in, "mask", "pred");
  TORCH_CHECK(imgs_in.dim() == 4, "imgs must be [B, C, H, W], got ", imgs_in.sizes());
  TORCH_CHECK(patch_size > 0 && imgs_in.size(2) % patch_size == 0 && imgs_in.size(3) % patch_size == 0,
              "imgs height and width must be divisible by patch_size=", patch_size, ", got ", imgs_in.sizes());
  const int64_t batch = imgs_in.size(0), channels = imgs_in.size(1);
  const int64_t grid_h = imgs_in.size(2) / patch_size, grid_w = imgs_in.size(3) / patch_size;
  const int64_t length = grid_h * grid_w, patch_numel = patch_size * patch_size * channels;
  TORCH_CHECK(pred_in.dim() == 3 && pred_in.size(0) == batch && pred_in.size(1) == length &&
                  pred_in.size(2) == patch_numel,
              "pred must be [", batch, ", ", length, ", ", patch_numel, "], got ", pred_in.sizes());
  TORCH_CHECK(mask_in.dim() == 2 && mask_in.size(0) == batch && mask_in.size(1) == length, "mask must be [", batch,
              ", ", length, "], got ", mask_in.sizes());
  TORCH_CHECK(!norm_pix || patch_numel >= 2, "norm_pix needs at least 2 values per patch");
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  TORCH_CHECK(patch_numel * static_cast<int64_t>(sizeof(float)) <= kSharedBudget, "masked_mse_loss supports at most ",
              kSharedBudget / sizeof(float), " values per patch, got ", patch_numel);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor imgs = imgs_in.contiguous();
  const at::Tensor mask = mask_in.to(at::kFloat).contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto fp32 = pred.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, fp32);
  at::Tensor mask_sum = at::empty({1}, fp32);
  at::Tensor per_patch = at::empty({batch * length}, fp32);
  at::Tensor grad = at::empty_like(pred);
  ordered_sum_kernel<<<1, kSumThreads, 0, stream>>>(mask.const_data_ptr<float>(), mask.numel(), nullptr,
                                                    mask_sum.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (per_patch.numel() > 0) {
    const LossGeometry g{batch * length, length, channels, imgs.size(2), imgs.size(3), patch_size, grid_w, patch_numel};
    const int64_t bytes_per_warp = patch_numel * static_cast<int64_t>(sizeof(float));
    const int warps = static_cast<int>(std::clamp<int64_t>(kSharedBudget / bytes_per_warp, 1, kWarpsMax));
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(g.patches, warps), 1 << 20));
    const size_t smem = static_cast<size_t>(warps * bytes_per_warp);
    MAE_FAST_DISPATCH_FLOATING(pred.scalar_type(), "masked_mse_loss_cuda", [&] {
      using pred_t = scalar_t;
      MAE_FAST_DISPATCH_FLOATING(imgs.scalar_type(), "masked_mse_loss_cuda_imgs", [&] {
        masked_mse_patch_kernel<pred_t, scalar_t><<<blocks, warps * 32, smem, stream>>>(
            pred.const_data_ptr<pred_t>(), imgs.const_data_ptr<scalar_t>(), mask.const_data_ptr<float>(),
            mask_sum.const_data_ptr<float>(), grad.mutable_data_ptr<pred_t>(), per_patch.mutable_data_ptr<float>(), g,
            norm_pix, static_cast<float>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  ordered_sum_kernel<<<1, kSumThreads, 0, stream>>>(per_patch.const_data_ptr<float>(), per_patch.numel(),
                                                    mask_sum.const_data_ptr<float>(), loss.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, store_grad ? grad : at::empty({0}, pred.options()), mask_sum.reshape({})};
}

}  // namespace mae_fast
