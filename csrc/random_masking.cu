// random_masking: noise [B, L] -> ids_keep [B, K], ids_restore [B, L] (int64), mask [B, L] (fp32).
//
// One block per row sorts (noise, index) pairs with a bitonic sort in shared memory (L <= 1024). The
// noise is mapped to an order-preserving 32-bit key and the patch index is packed below it, so all
// 64-bit keys are distinct and ties in noise go to the lower index: exactly a stable ascending argsort
// (-0.0 equals +0.0; NaN sorts last, as in torch.sort).
#include "dispatch.h"
#include "ops.h"

#include <ATen/ops/empty.h>

namespace mae_fast {
namespace {

constexpr int kMaxLength = 1024;
constexpr int kThreads = 512;

__device__ __forceinline__ uint32_t order_key(float v) {
  if (isnan(v)) return 0xffffffffu;
  if (v == 0.f) v = 0.f;  // -0.0 -> +0.0
  const uint32_t bits = __float_as_uint(v);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

template <typename T>
__global__ void random_masking_kernel(const T* __restrict__ noise, int64_t* __restrict__ ids_keep,
                                      int64_t* __restrict__ ids_restore, float* __restrict__ mask, int length,
                                      int padded, int keep) {
  __shared__ unsigned long long keys[kMaxLength];
  const int64_t row = blockIdx.x;
  for (int i = threadIdx.x; i < padded; i += blockDim.x) {
    keys[i] = i < length ? (static_cast<unsigned long long>(order_key(to_float(noise[row * length + i]))) << 32) |
                               static_cast<unsigned long long>(i)
                         : ~0ull;
  }
  __syncthreads();
  for (int k = 2; k <= padded; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < padded; i += blockDim.x) {
        const int partner = i ^ j;
        if (partner > i) {
          const unsigned long long a = keys[i], b = keys[partner];
          const bool ascending = (i & k) == 0;
          if ((a > b) == ascending) {
            keys[i] = b;
            keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int rank = threadIdx.x; rank < length; rank += blockDim.x) {
    const int64_t index = static_cast<int64_t>(keys[rank] & 0xffffffffull);
    if (rank < keep) ids_keep[row * keep + rank] = index;
    ids_restore[row * length + index] = rank;
    mask[row * length + index] = rank < keep ? 0.f : 1.f;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cuda(const at::Tensor& noise_in, int64_t len_keep) {
  MAE_FAST_CHECK_CUDA(noise_in, "noise");
  TORCH_CHECK(noise_in.dim() == 2, "noise must be [B, L], got ", noise_in.sizes());
  const int64_t batch = noise_in.size(0), length = noise_in.size(1);
  TORCH_CHECK(length >= 1 && length <= kMaxLength, "random_masking supports 1 <= L <= ", kMaxLength, ", got L=", length);
  TORCH_CHECK(len_keep >= 0 && len_keep <= length, "len_keep must lie in [0, ", length, "], got ", len_keep);
  TORCH_CHECK(batch <= 0x7fffffff, "random_masking supports at most 2**31-1 rows, got ", batch);
  const c10::cuda::CUDAGuard guard(noise_in.device());
  const at::Tensor noise = noise_in.contiguous();
  const auto options = noise.options();
  at::Tensor ids_keep = at::empty({batch, len_keep}, options.dtype(at::kLong));
  at::Tensor ids_restore = at::empty({batch, length}, options.dtype(at::kLong));
  at::Tensor mask = at::empty({batch, length}, options.dtype(at::kFloat));
  if (batch == 0) return {ids_keep, ids_restore, mask};
  int padded = 1;
  while (padded < length) padded <<= 1;
  MAE_FAST_DISPATCH_FLOATING(noise.scalar_type(), "random_masking_cuda", [&] {
    random_masking_kernel<scalar_t><<<static_cast<unsigned>(batch), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        noise.const_data_ptr<scalar_t>(), ids_keep.mutable_data_ptr<int64_t>(), ids_restore.mutable_data_ptr<int64_t>(),
        mask.mutable_data_ptr<float>(), static_cast<int>(length), padded, static_cast<int>(len_keep));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ids_keep, ids_restore, mask};
}

}  // namespace mae_fast
