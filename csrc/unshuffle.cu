// unshuffle_mask_tokens: the decoder input [B, L+1, D] from the K+1 embedded tokens (cls first), the mask
// token and ids_restore, with the position table added; and its backward.
//
// Forward: one thread per 16-byte vector (or element) of the output, gathering its source row.
// Backward: grad_x is pulled through the inverse of ids_restore, held per image in shared memory, so each
// grad_x row is written once (no atomics); the mask-token gradient is a fixed-order fp32 reduction.
#include "dispatch.h"
#include "ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <climits>

namespace mae_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxPatches = 4096;  // inverse of ids_restore + the ids row per image in shared memory

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// out[b, 0] = x[b, 0] + pos[0]; out[b, 1 + l] = (r < K ? x[b, 1 + r] : mask_token) + pos[1 + l], r = ids_restore[b, l].
template <typename T, int VEC>
__global__ void unshuffle_forward_kernel(const T* __restrict__ x, const T* __restrict__ mask_token,
                                         const void* __restrict__ ids, bool ids_int64, const T* __restrict__ pos,
                                         T* __restrict__ out, int64_t batch, int64_t keep, int64_t length,
                                         int64_t dim) {
  const int64_t runs = dim / VEC;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= batch * (length + 1) * runs) return;
  const int64_t dv = u % runs;
  const int64_t t = (u / runs) % (length + 1);
  const int64_t b = u / (runs * (length + 1));
  const T* src;
  if (t == 0) {
    src = x + b * (keep + 1) * dim;
  } else {
    const int64_t r = load_index(ids, ids_int64, b * length + t - 1);
    CUDA_KERNEL_ASSERT(r >= 0 && r < length);
    if (r < 0 || r >= length) return;
    src = r < keep ? x + (b * (keep + 1) + 1 + r) * dim : mask_token;
  }
  Vec<T, VEC> value = *reinterpret_cast<const Vec<T, VEC>*>(src + dv * VEC);
  if (pos != nullptr) {
    const Vec<T, VEC> row = *reinterpret_cast<const Vec<T, VEC>*>(pos + t * dim + dv * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) value.v[e] = from_float<T>(to_float(value.v[e]) + to_float(row.v[e]));
  }
  *reinterpret_cast<Vec<T, VEC>*>(out + (b * (length + 1) + t) * dim + dv * VEC) = value;
}

// grad_x[b, 0] = grad[b, 0]; grad_x[b, 1 + r] = sum of grad[b, 1 + l] over l with ids_restore[b, l] == r (r < K).
template <typename T, int VEC>
__global__ void unshuffle_backward_x_kernel(const T* __restrict__ grad, const void* __restrict__ ids, bool ids_int64,
                                            T* __restrict__ grad_x, int64_t keep, int64_t length, int64_t dim) {
  extern __shared__ int unshuffle_smem[];
  int* inverse = unshuffle_smem;           // [K]: the l with ids_restore[b, l] == r (smallest), INT_MAX if none
  int* ids_row = unshuffle_smem + keep;    // [L]
  __shared__ int duplicate;
  const int64_t b = blockIdx.y;
  for (int64_t r = threadIdx.x; r < keep; r += blockDim.x) inverse[r] = INT_MAX;
  if (threadIdx.x == 0) duplicate = 0;
  __syncthreads();
  for (int64_t l = threadIdx.x; l < length; l += blockDim.x) {
    const int64_t r = load_index(ids, ids_int64, b * length + l);
    CUDA_KERNEL_ASSERT(r >= 0 && r < length);
    ids_row[l] = static_cast<int>(r);
    if (r >= 0 && r < keep) atomicMin(inverse + r, static_cast<int>(l));
  }
  __syncthreads();
  for (int64_t l = threadIdx.x; l < length; l += blockDim.x) {
    const int r = ids_row[l];
    if (r >= 0 && r < keep && inverse[r] != l) duplicate = 1;
  }
  __syncthreads();
  const int64_t runs = dim / VEC;
  const int64_t units = (keep + 1) * runs;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t dv = u % runs;
    const int64_t row = u / runs;  // row of grad_x: 0 = cls, 1 + r = visible token r
    T* dst = grad_x + (b * (keep + 1) + row) * dim + dv * VEC;
    const T* grad_b = grad + b * (length + 1) * dim + dv * VEC;
    if (row == 0 || !duplicate) {
      Vec<T, VEC> value;
      const int64_t source = row == 0 ? 0 : static_cast<int64_t>(inverse[row - 1]);
      if (source == INT_MAX) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) value.v[e] = from_float<T>(0.f);
      } else {
        value = *reinterpret_cast<const Vec<T, VEC>*>(grad_b + (row == 0 ? 0 : 1 + source) * dim);
      }
      *reinterpret_cast<Vec<T, VEC>*>(dst) = value;
    } else {
      for (int e = 0; e < VEC; ++e) {
        float acc = 0.f;
        for (int64_t l = 0; l < length; ++l)
          if (ids_row[l] == row - 1) acc += to_float(grad_b[(1 + l) * dim + e]);
        dst[e] = from_float<T>(acc);
      }
    }
  }
}

// partial[b, d] = sum over l with ids_restore[b, l] >= K of grad[b, 1 + l, d], in fp32 and in l order.
template <typename T>
__global__ void unshuffle_mask_token_partial_kernel(const T* __restrict__ grad, const void* __restrict__ ids,
                                                    bool ids_int64, float* __restrict__ partial, int64_t keep,
                                                    int64_t length, int64_t dim) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (d >= dim) return;
  float acc = 0.f;
  for (int64_t l = 0; l < length; ++l) {
    if (load_index(ids, ids_int64, b * length + l) >= keep) acc += to_float(grad[(b * (length + 1) + 1 + l) * dim + d]);
  }
  partial[b * dim + d] = acc;
}

int grid_for(int64_t units) { return static_cast<int>(ceil_div(units, kThreads)); }

template <typename T>
int vector_width(int64_t dim, std::initializer_list<const void*> pointers) {
  constexpr int vec = 16 / sizeof(T);
  if (dim % vec) return 1;
  for (const void* p : pointers)
    if (p != nullptr && !is_aligned(p, 16)) return 1;
  return vec;
}

}  // namespace

at::Tensor unshuffle_mask_tokens_cuda(const at::Tensor& x_in, const at::Tensor& mask_token_in,
                                      const at::Tensor& ids_restore_in, const std::optional<at::Tensor>& pos_embed_in) {
  MAE_FAST_CHECK_CUDA(x_in, "x");
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(1) >= 2, "x must be [B, K+1, D] with K >= 1, got ", x_in.sizes());
  const int64_t batch = x_in.size(0), keep = x_in.size(1) - 1, dim = x_in.size(2);
  TORCH_CHECK(mask_token_in.numel() == dim, "mask_token must hold ", dim, " values, got ", mask_token_in.sizes());
  MAE_FAST_CHECK_SAME_DEVICE(mask_token_in, x_in, "mask_token", "x");
  MAE_FAST_CHECK_SAME_DEVICE(ids_restore_in, x_in, "ids_restore", "x");
  MAE_FAST_CHECK_INDEX_DTYPE(ids_restore_in, "ids_restore");
  TORCH_CHECK(ids_restore_in.dim() == 2 && ids_restore_in.size(0) == batch && ids_restore_in.size(1) >= keep,
              "ids_restore must be [B, L] with B=", batch, " and L >= K=", keep, ", got ", ids_restore_in.sizes());
  const int64_t length = ids_restore_in.size(1);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  // As the reference: mask token and table are cast to x's dtype first, the sum is rounded once.
  const at::Tensor mask_token = mask_token_in.reshape({dim}).to(x.scalar_type()).contiguous();
  const at::Tensor ids = ids_restore_in.contiguous();
  at::Tensor pos;
  if (pos_embed_in.has_value()) {
    TORCH_CHECK(pos_embed_in->numel() == (length + 1) * dim && pos_embed_in->size(-1) == dim,
                "pos_embed must be [L+1, D] = [", length + 1, ", ", dim, "], got ", pos_embed_in->sizes());
    MAE_FAST_CHECK_SAME_DEVICE(*pos_embed_in, x_in, "pos_embed", "x");
    pos = pos_embed_in->reshape({length + 1, dim}).to(x.scalar_type()).contiguous();
  }
  at::Tensor out = at::empty({batch, length + 1, dim}, x.options());
  if (out.numel() == 0) return out;
  MAE_FAST_DISPATCH_FLOATING(x.scalar_type(), "unshuffle_mask_tokens_cuda", [&] {
    const scalar_t* pos_ptr = pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr;
    const int vec = vector_width<scalar_t>(
        dim, {x.const_data_ptr(), mask_token.const_data_ptr(), pos_ptr, out.const_data_ptr()});
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const bool i64 = ids.scalar_type() == at::kLong;
    const int64_t units = batch * (length + 1) * dim / vec;
    if (vec > 1) {
      unshuffle_forward_kernel<scalar_t, 16 / sizeof(scalar_t)><<<grid_for(units), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), mask_token.const_data_ptr<scalar_t>(), ids.const_data_ptr(), i64, pos_ptr,
          out.mutable_data_ptr<scalar_t>(), batch, keep, length, dim);
    } else {
      unshuffle_forward_kernel<scalar_t, 1><<<grid_for(units), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), mask_token.const_data_ptr<scalar_t>(), ids.const_data_ptr(), i64, pos_ptr,
          out.mutable_data_ptr<scalar_t>(), batch, keep, length, dim);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unshuffle_mask_tokens_backward_cuda(const at::Tensor& grad_in,
                                                                       const at::Tensor& ids_restore_in,
                                                                       int64_t len_keep, bool mask_token_grad) {
  MAE_FAST_CHECK_CUDA(grad_in, "grad");
  MAE_FAST_CHECK_SAME_DEVICE(ids_restore_in, grad_in, "ids_restore", "grad");
  MAE_FAST_CHECK_INDEX_DTYPE(ids_restore_in, "ids_restore");
  TORCH_CHECK(grad_in.dim() == 3, "grad must be [B, L+1, D], got ", grad_in.sizes());
  const int64_t batch = grad_in.size(0), dim = grad_in.size(2);
  TORCH_CHECK(ids_restore_in.dim() == 2 && ids_restore_in.size(0) == batch && ids_restore_in.size(1) + 1 == grad_in.size(1),
              "ids_restore must be [B, L] for grad ", grad_in.sizes(), ", got ", ids_restore_in.sizes());
  const int64_t length = ids_restore_in.size(1);
  TORCH_CHECK(len_keep >= 1 && len_keep <= length, "len_keep must lie in [1, ", length, "], got ", len_keep);
  TORCH_CHECK(length <= kMaxPatches, "unshuffle_mask_tokens backward supports L <= ", kMaxPatches, ", got ", length);
  TORCH_CHECK(batch <= 65535, "unshuffle_mask_tokens backward supports at most 65535 images, got ", batch);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor ids = ids_restore_in.contiguous();
  at::Tensor grad_x = at::empty({batch, len_keep + 1, dim}, grad.options());
  at::Tensor grad_mask_token = at::empty({mask_token_grad ? dim : 0}, grad.options().dtype(at::kFloat));
  if (grad_x.numel() == 0) return {grad_x, grad_mask_token.zero_()};  // B == 0: the mask token gets no gradient
  MAE_FAST_DISPATCH_FLOATING(grad.scalar_type(), "unshuffle_mask_tokens_backward_cuda", [&] {
    const int vec = vector_width<scalar_t>(dim, {grad.const_data_ptr(), grad_x.const_data_ptr()});
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const bool i64 = ids.scalar_type() == at::kLong;
    const int64_t units = (len_keep + 1) * dim / vec;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(units, kThreads), 65535)),
                    static_cast<unsigned>(batch));
    const size_t smem = static_cast<size_t>(len_keep + length) * sizeof(int);
    if (vec > 1) {
      unshuffle_backward_x_kernel<scalar_t, 16 / sizeof(scalar_t)><<<grid, kThreads, smem, stream>>>(
          grad.const_data_ptr<scalar_t>(), ids.const_data_ptr(), i64, grad_x.mutable_data_ptr<scalar_t>(), len_keep,
          length, dim);
    } else {
      unshuffle_backward_x_kernel<scalar_t, 1><<<grid, kThreads, smem, stream>>>(
          grad.const_data_ptr<scalar_t>(), ids.const_data_ptr(), i64, grad_x.mutable_data_ptr<scalar_t>(), len_keep,
          length, dim);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (mask_token_grad) {
      at::Tensor partial = at::empty({batch, dim}, grad.options().dtype(at::kFloat));
      const dim3 partial_grid(static_cast<unsigned>(ceil_div(dim, kThreads)), static_cast<unsigned>(batch));
      unshuffle_mask_token_partial_kernel<scalar_t><<<partial_grid, kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), ids.const_data_ptr(), i64, partial.mutable_data_ptr<float>(), len_keep,
          length, dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_mask_token.copy_(at::sum(partial, {0}));
    }
  });
  return {grad_x, grad_mask_token};
}

}  // namespace mae_fast
