// dtype dispatch, native CUDA type mapping and launch helpers shared by every kernel of mae_fast._C.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

// The floating types every elementwise/gather kernel is compiled for: float, half, bfloat16.
// float64 is not compiled in: the Python checks send it to the other backends.
#define MAE_FAST_DISPATCH_FLOATING(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)               \
                                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)            \
                                         AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// The 16-bit types of the tensor-core kernels (attention): half and bfloat16 only.
#define MAE_FAST_DISPATCH_HALF_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

#define MAE_FAST_CHECK_CUDA(x, name) \
  TORCH_CHECK((x).is_cuda(), name " must be a CUDA tensor, got a tensor on ", (x).device())

#define MAE_FAST_CHECK_SAME_DEVICE(x, y, xname, yname)                                                  \
  TORCH_CHECK((x).device() == (y).device(), xname " and " yname " must be on one device, got ", (x).device(), \
              " and ", (y).device())

#define MAE_FAST_CHECK_INDEX_DTYPE(x, name)                                                           \
  TORCH_CHECK((x).scalar_type() == at::kLong || (x).scalar_type() == at::kInt, name " must be int64 or int32, got ", \
              (x).scalar_type())

namespace mae_fast {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool is_aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// at::Half / at::BFloat16 -> the CUDA native types the intrinsics and WMMA fragments take.
template <typename scalar_t>
struct Native {
  using type = scalar_t;
};
template <>
struct Native<at::Half> {
  using type = __half;
};
template <>
struct Native<at::BFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(at::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(at::BFloat16 x) { return static_cast<float>(x); }

// Round-to-nearest-even conversion from fp32, as PyTorch's casts do.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ at::Half from_float<at::Half>(float x) { return at::Half(x); }
template <>
__device__ __forceinline__ at::BFloat16 from_float<at::BFloat16>(float x) { return at::BFloat16(x); }

// Reads index i of an int64 or int32 index tensor (ids_keep / ids_restore may be either).
__device__ __forceinline__ int64_t load_index(const void* ids, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(ids)[i] : static_cast<int64_t>(static_cast<const int32_t*>(ids)[i]);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

}  // namespace mae_fast
