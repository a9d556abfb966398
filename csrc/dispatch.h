// dtype dispatch and launch helpers shared by every kernel of mae_fast._C.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// The floating types every elementwise/gather kernel is compiled for: float, half, bfloat16.
#define MAE_FAST_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

#define MAE_FAST_CHECK_CUDA(x, name) \
  TORCH_CHECK((x).is_cuda(), name " must be a CUDA tensor, got a tensor on ", (x).device())

namespace mae_fast {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mae_fast
